"""The docs stay true: every repository path, op, public name and model name that README.md,
CONTRIBUTING.md, CHANGELOG.md and docs/*.md mention in backticks exists."""

import glob
import os
import re

import pytest
import torch

import vitkernels
from vitkernels.models import list_models

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCS = [p for p in ["README.md", "CONTRIBUTING.md", "CHANGELOG.md"] if os.path.exists(os.path.join(ROOT, p))] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))
)
TOP = ("vitkernels/", "csrc/", "tests/", "bench/", "scripts/", "examples/", "docs/", ".ci/")
# Model-name shapes of the families the docs talk about (vitkernels' and timm's names).
MODEL = re.compile(
    r"^(vit|deit|swin|swinv2|pvt_v2|segformer|xcit|timesformer|vivit|cait|beit|twins|mvitv2)_[a-z0-9_]+$"
)


def _spans(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        text = f.read()
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks: examples, not references
    return re.findall(r"`([^`\n]+)`", text)


def _repo_path(token):
    """The path a backticked token names (None when it names none): `csrc/torch/x.cpp`,
    `tests/test_x.py::test_y`, `docs/x.md` ... Templates (`<op>`) and globs are not checked."""
    token = token.split("::")[0].rstrip(".,:;)")
    token = re.sub(r"\s*\(.*$", "", token)
    if not token.startswith(TOP) or any(c in token for c in "<>*{} |"):
        return None
    return token


@pytest.mark.parametrize("doc", DOCS)
def test_paths_named_in_the_docs_exist(doc):
    missing = sorted({p for p in map(_repo_path, _spans(doc)) if p and not os.path.exists(os.path.join(ROOT, p))})
    assert not missing, f"{doc} names paths that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS)
def test_ops_and_public_names_in_the_docs_exist(doc):
    missing = set()
    for token in _spans(doc):
        if "<" in token:  # a template such as torch.ops.vitkernels._<op>_fwd
            continue
        for name in re.findall(r"\btorch\.ops\.vitkernels\.(\w+)", token):
            if not hasattr(torch.ops.vitkernels, name):
                missing.add(f"torch.ops.vitkernels.{name}")
        for name in re.findall(r"(?<![\w.])vitkernels\.(\w+)", token):
            if name == "_C":  # the compiled extension: present only where it was built
                continue
            if (
                not hasattr(vitkernels, name)
                and not os.path.exists(os.path.join(ROOT, "vitkernels", name))
                and not os.path.exists(os.path.join(ROOT, "vitkernels", name + ".py"))
            ):
                missing.add(f"vitkernels.{name}")
    assert not missing, f"{doc} names what vitkernels does not have: {sorted(missing)}"


@pytest.mark.parametrize("doc", DOCS)
def test_model_names_in_the_docs_exist(doc):
    """A model name is one of vitkernels.models' or, where timm imports, one of timm's (names of timm's
    modules, of the integrations' functions and bench case labels like `swin_t s1@224` are not models)."""
    try:
        import timm

        known = set(timm.list_models()) | {m.name for m in __import__("pkgutil").iter_modules(timm.models.__path__)}
    except Exception:  # without timm only vitkernels' names can be checked
        known = None
    from vitkernels.integrations import hf
    from vitkernels.integrations import timm as vk_timm

    code_names = set(dir(vk_timm)) | set(dir(hf))
    ours = set(list_models())
    missing = set()
    for token in _spans(doc):
        for name in re.findall(r"[a-z0-9_]+", token):
            if (
                MODEL.match(name)
                and name not in ours
                and (known is None or name not in known)
                and name not in code_names
                and re.search(r"\d", name)
                and not re.search(rf"\b{name} s\d", token)
            ):
                missing.add(name)
    if known is None:
        missing = {n for n in missing if n.split("_")[0] in ("segformer", "timesformer", "vivit")}
    assert not missing, f"{doc} names models that exist neither in vitkernels nor in timm: {sorted(missing)}"
