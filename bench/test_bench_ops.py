"""pytest-benchmark suite: each op's representative case(s), vitkernels vs eager vs SDPA, bf16, GPU only.

    python -m pytest bench/test_bench_ops.py --benchmark-only --benchmark-json "$OUT/pytest-bench.json"

Each round runs one call (forward, or forward + autograd.grad) on rotating input copies and
synchronises, so host-clock rounds measure the GPU work. `vitkernels-bench ops` is the main benchmark
(CUDA-event timing, FLOP/byte accounting, more baselines); this suite is for pytest-benchmark's
comparisons between saved runs (`--benchmark-compare`). Not collected by the CPU test suite
(testpaths = tests); skipped without CUDA.
"""

import re

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pytest_benchmark")
if not torch.cuda.is_available():
    pytest.skip("the op benchmarks need a CUDA GPU", allow_module_level=True)

from vitkernels.bench import baselines, cases  # noqa: E402
from vitkernels.bench.cases import backend_that_runs  # noqa: E402
from vitkernels.bench.harness import _runner, _Sets  # noqa: E402

pytestmark = pytest.mark.gpu

CASES = cases.select_cases(cases.all_cases(), representative=True)
IMPLS = ("vitkernels", "eager", "sdpa")
DTYPE = torch.bfloat16


def _id(case):
    return re.sub(r"[^A-Za-z0-9_.@+-]+", "_", f"{case.op}-{case.label}")


@pytest.mark.parametrize("mode", cases.MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_op(benchmark, case, impl, mode):
    why = baselines.applies(impl, case.op)
    if why:
        pytest.skip(why)
    sets = _Sets(case, DTYPE, "cuda", 3, seed=0)
    try:
        built = baselines.build(impl, case, DTYPE, "cuda")
    except baselines.Unsupported as e:
        pytest.skip(str(e))
    run = _runner(built.fn, sets, mode)

    def step():
        run()
        torch.cuda.synchronize()

    with built.context():
        step()
        step()
        benchmark.group = f"{case.op} {case.label} {mode}"
        benchmark.extra_info.update(
            op=case.op,
            case=case.label,
            mode=mode,
            dtype="bfloat16",
            impl=impl,
            shape=case.shape,
            flops=case.flops_for(mode),
            bytes=case.bytes_for(mode, torch.empty((), dtype=DTYPE).element_size()),
        )
        if impl == "vitkernels":
            benchmark.extra_info["backend"] = backend_that_runs(case, sets.inputs[0])
        benchmark.pedantic(step, rounds=30, iterations=1, warmup_rounds=3)
