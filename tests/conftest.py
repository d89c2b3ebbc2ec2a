"""Test set-up. Without a CUDA build of torch the Triton kernels run in the interpreter on CPU
tensors: TRITON_INTERPRET must be set before triton is first imported, so it is decided here from
the torch build (no device query at import)."""
import os
import sys

import torch

if torch.version.cuda is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests/oracles.py, tests/tolerance.py

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
