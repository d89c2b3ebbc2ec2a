"""Persistent grids sized from the compiled kernel's occupancy (window_attention, sr_attention, xca).

CPU: the occupancy arithmetic (H100 numbers), the compiled-kernel glue with mocked kernels and
device properties, the VITKERNELS_GRID switch, and that results do not depend on the grid: the
kernels run in the interpreter with forced program counts (the GPU path's launcher with a mocked
occupancy, config 0 of every tuner): forwards bitwise equal, backwards within fp32 rounding of each
other and bitwise deterministic run to run. On a GPU the same tests run on the real kernels.
"""

from types import SimpleNamespace

import pytest
import torch
import triton

import vitkernels as vk
from vitkernels.triton import _launch as launch
from vitkernels.triton import sr_attention as S
from vitkernels.triton import window_attention as W
from vitkernels.triton import xca as X

from helpers import ConfigForcer, require_triton

_INTERPRET, DEVICE, _ = require_triton()
H100 = launch.H100


# ------------------------------------------------------------------------------ the arithmetic


@pytest.mark.parametrize(
    "regs,shared,warps,want",
    [
        (255, 0, 4, 2),  # the window backward's old register count: 2 CTAs of 4 warps
        (168, 0, 4, 3),  # the cap of its new maxnreg configs
        (163, 0, 4, 3),  # 163 → 168 per thread (a warp's registers come in units of 256)
        (128, 0, 4, 4),
        (130, 0, 8, 1),  # 136 × 256 threads = 34816 > 65536 / 2
        (128, 0, 8, 2),
        (255, 0, 8, 1),
        (64, 0, 4, 8),
        (32, 0, 1, 32),  # the CTA cap
        (32, 0, 2, 32),
        (16, 0, 8, 8),  # the thread cap: 2048 / 256
        (96, 60 * 1024, 4, 3),  # shared memory: 233472 // (61440 + 1024)
        (96, 120 * 1024, 4, 1),
        (96, 230 * 1024, 4, 0),  # does not fit at all
        (0, 0, 4, 16),  # registers unknown: threads only
    ],
)
def test_resident_programs_h100(regs, shared, warps, want):
    assert launch.resident_programs(regs, shared, warps, H100) == want


def test_resident_programs_other_limits():
    sm86 = launch.SMLimits(sms=84, threads=1536, shared=102400, ctas=16)
    assert launch.resident_programs(255, 0, 4, sm86) == 2
    assert launch.resident_programs(64, 0, 4, sm86) == 8  # 1536 threads / 128 (registers allow 8 too)
    assert launch.resident_programs(32, 0, 1, sm86) == 16  # its CTA cap


def test_sm_limits_from_device_properties(monkeypatch):
    props = SimpleNamespace(
        multi_processor_count=132,
        regs_per_multiprocessor=65536,
        max_threads_per_multi_processor=2048,
        shared_memory_per_multiprocessor=233472,
        major=9,
        minor=0,
    )
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    launch._sm_limits.cache_clear()
    try:
        assert launch.sm_limits(torch.device("cuda", 0)) == H100
        props.major, props.minor, props.multi_processor_count = 8, 9, 128
        launch._sm_limits.cache_clear()
        assert launch.sm_limits(torch.device("cuda", 0)).ctas == 24  # sm_89
    finally:
        launch._sm_limits.cache_clear()


def test_one_wave_split_at_real_shapes():
    """Swin-T stage 1 at batch 64: 64 images × 64 windows × 3 heads; 2 resident programs of the
    backward per SM on 132 SMs → 88 groups of 47 windows per head = 264 programs, one wave."""
    wpg = launch.one_wave_split(64 * 64, 3, 2 * 132)
    assert wpg == 47 and triton.cdiv(64 * 64, wpg) * 3 == 264
    assert launch.one_wave_split(100, 1, 1000) == 1  # more slots than work: one unit each
    assert launch.one_wave_split(100, 500, 132) == 100  # more lanes than slots: a lane per program


# ------------------------------------------------------------------------------------ the switch


def test_host_arithmetic_matches_triton():
    """launch.cdiv / launch.next_pow2 stand in for triton.cdiv / triton.next_power_of_2 on the host
    (those are ConstexprFunctions, ~1.5 µs a call)."""
    assert all(launch.next_pow2(n) == triton.next_power_of_2(n) for n in range(0, 4100))
    assert all(launch.cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 300) for b in range(1, 70))
    assert launch.cdiv(12288, 132) == 94 and launch.next_pow2(1 << 40) == 1 << 40


def test_grid_mode(monkeypatch):
    monkeypatch.delenv("VITKERNELS_GRID", raising=False)
    assert launch.grid_mode() == "auto"
    monkeypatch.setenv("VITKERNELS_GRID", " Fixed ")
    assert launch.grid_mode() == "fixed"
    monkeypatch.setenv("VITKERNELS_GRID", "persistent")
    with pytest.raises(ValueError, match="VITKERNELS_GRID='persistent' is not one of auto, fixed"):
        launch.grid_mode()


@pytest.mark.parametrize("op", ["window", "sr", "xca"])
def test_bad_grid_flag_fails_every_launcher(monkeypatch, op):
    monkeypatch.setenv("VITKERNELS_GRID", "8")
    with pytest.raises(ValueError, match="VITKERNELS_GRID"), vk.use_backend("triton"):
        _run(op, torch.float32, backward=False)


# ----------------------------------------------------------------------------- compiled-kernel glue


class Autotuner:
    """Stands in for triton's Autotuner (``launch.occupancy`` unwraps by class name)."""

    def __init__(self, compiled, configs):
        self.arg_names = ["X", "n"]
        self.nargs = None
        self.configs = configs
        self.fn = SimpleNamespace(warmup=self.warmup)
        self.compiled = compiled
        self.warmups = []

    def prune_configs(self, kwargs):
        assert self.nargs is not None  # the pruner reads the call's arguments
        return [c for c in self.configs if c.kwargs["BLOCK"] <= 2 * self.nargs["n"]]

    def warmup(self, *args, grid, **kwargs):
        self.warmups.append(kwargs)
        if isinstance(self.compiled, Exception):
            raise self.compiled
        return self.compiled


def _compiled(n_regs, shared=0, warps=4, lazy=False):
    meta = SimpleNamespace(shared=shared, num_warps=warps)
    kernel = SimpleNamespace(n_regs=0 if lazy else n_regs, metadata=meta)
    kernel._init_handles = lambda: setattr(kernel, "n_regs", n_regs)  # registers known once loaded
    return kernel


def test_kernel_info():
    assert launch.kernel_info(None) is None  # the sm_90a recorder's warmup compiles nothing
    assert launch.kernel_info(_compiled(200, 1024, 8)) == (200, 1024, 8)
    assert launch.kernel_info(_compiled(168, lazy=True)) == (168, 0, 4)
    broken = SimpleNamespace(n_regs=0, metadata=None, _init_handles=lambda: 1 / 0)
    assert launch.kernel_info(broken) is None


def test_occupancy_reads_the_reference_config_once(monkeypatch):
    monkeypatch.setattr(launch, "sm_limits", lambda device: H100)
    configs = launch.configs(["BLOCK"], [(64, 8, 1), (16, 4, 2, 168), (32, 4, 1)])
    tuned = Autotuner(_compiled(168), configs)
    x = torch.empty(4)
    dev = torch.device("cuda", 0)
    assert launch.occupancy(tuned, (x, 10), {"M": 7}, dev) == 3
    # the first config the pruner keeps (BLOCK 64 > 2·10 is dropped), with its options
    want = {"M": 7, "BLOCK": 16, "num_warps": 4, "num_stages": 2, "maxnreg": 168}
    assert len(tuned.warmups) == 1 and want.items() <= tuned.warmups[0].items()
    assert tuned.nargs is None
    assert launch.occupancy(tuned, (x, 10), {"M": 7}, dev) == 3  # cached: no second warmup
    assert len(tuned.warmups) == 1
    assert launch.occupancy(tuned, (x, 40), {"M": 7}, dev) == 3  # another signature: read again
    assert tuned.warmups[-1]["BLOCK"] == 64 and len(tuned.warmups) == 2


def test_occupancy_fallbacks(monkeypatch):
    monkeypatch.setattr(launch, "sm_limits", lambda device: H100)
    configs = launch.configs(["BLOCK"], [(16, 4, 1)])
    dev = torch.device("cuda", 0)
    assert launch.occupancy(Autotuner(None, configs), (torch.empty(1), 10), {}, dev) is None
    failing = Autotuner(RuntimeError("no driver"), configs)
    with pytest.warns(UserWarning, match="no occupancy.*no driver"):
        assert launch.occupancy(failing, (torch.empty(2), 10), {}, dev) is None
    assert launch.occupancy(failing, (torch.empty(2), 10), {}, dev) is None  # cached, no second warning
    huge = Autotuner(_compiled(32, shared=300 * 1024), configs)
    assert launch.occupancy(huge, (torch.empty(3), 10), {}, dev) == 1  # at least one program per SM
    interpreted = Autotuner(None, configs)
    interpreted.fn = type("InterpretedFunction", (), {})()
    assert launch.occupancy(interpreted, (torch.empty(4), 10), {}, dev) is None


def test_call_key_is_what_triton_specialises_on():
    """The cache key of a launch: tensors by dtype and 16-byte alignment (not identity), ints and
    bools by value and type, floats by type only."""
    key = launch._call_key
    x, y = torch.empty(8), torch.empty(8)
    assert key((x, 3, 0.5, None)) == key((y, 3, 0.25, None))
    assert key((x, 3, 0.5)) != key((x, 4, 0.5)) != key((x.half(), 4, 0.5))
    assert key((x, 1)) != key((x, True)) and key((x, 1)) != key((x, 1.0))
    assert key((x, x[1:])) != key((x, x[4:])) == key((x, y))  # x[1:] is 4 bytes off: not aligned
    assert key((x,)) != key((x, 2)) and key(()) == key(())


def test_occupancy_builds_the_arguments_only_on_a_miss(monkeypatch):
    monkeypatch.setattr(launch, "sm_limits", lambda device: H100)
    tuned = Autotuner(_compiled(168), launch.configs(["BLOCK"], [(16, 4, 1)]))
    dev, built = torch.device("cuda", 0), []

    def make_args():
        built.append(1)
        return (torch.empty(5), 10)

    sig = launch.signature([torch.empty(5)], 10)
    assert launch.occupancy(tuned, make_args, {"M": 3}, dev, signature=sig) == 3 and len(built) == 1
    assert launch.occupancy(tuned, make_args, {"M": 3}, dev, signature=sig) == 3 and len(built) == 1  # a hit
    assert launch.occupancy(tuned, make_args, {"M": 4}, dev, signature=sig) == 3 and len(built) == 2
    assert launch.occupancy(tuned, make_args, {"M": 3}, dev) == 3 and len(built) == 3  # no signature: built


class _Asked(Exception):
    pass


def test_sr_signatures_fix_the_call_key(monkeypatch):
    """sr_attention's launchers give occupancy a signature instead of their arguments: launches with
    equal signatures must have equal ``_call_key``s (the compile the occupancy is read for). Varies
    each input of the launchers: sizes, dtypes, strides, views off the 16-byte alignment."""
    seen = {}

    def asked(tuned, args, kwargs, device, signature=None):
        key = (id(tuned), signature, tuple(kwargs.items()))
        seen.setdefault(key, set()).add(launch._call_key(args()))
        raise _Asked  # the launch itself is not needed

    _gpu_path(monkeypatch, asked)

    def views(b, n, m, d, dtype, offset=0, strided=False):
        def heads(rows, cols):
            t = torch.zeros(b, rows, cols * (2 if strided else 1) + offset, dtype=dtype)
            return t[..., offset : offset + cols].view(b, rows, 2, cols // 2).transpose(1, 2)  # 2 heads

        return heads(n, 2 * d), heads(m, 2 * d), heads(m, 2 * d)

    cases = [
        (2, 300, 49, 32, torch.float32, 0, False),
        (3, 300, 49, 32, torch.float32, 0, False),
        (2, 300, 49, 32, torch.float16, 0, False),
        (2, 300, 49, 32, torch.float32, 1, False),
        (2, 300, 49, 32, torch.float32, 0, True),
        (2, 260, 49, 32, torch.float32, 0, False),
        (2, 300, 50, 32, torch.float32, 0, False),
        (2, 300, 49, 16, torch.float32, 0, False),
    ]
    for case in cases:
        q, k, v = views(*case)
        out, dout, dq, dk, dv = (torch.zeros_like(t) for t in (q, q, q, k, v))
        lse = torch.zeros(q.shape[:3])
        bwd = (dout, q, k, v, out, lse, 0.5, dq, dk, dv)
        for launcher, args in (
            (S.sr_attention_forward, (q, k, v, 0.5, out)),
            (S.sr_attention_backward, bwd),
            (S.sr_attention_split_backward, bwd),
        ):
            with pytest.raises(_Asked):
                launcher(*args)
    assert all(len(keys) == 1 for keys in seen.values())
    # and no finer than the key here: one signature per compile (22: the forward takes no batch size)
    assert len(seen) == len(set().union(*seen.values())) == 3 * len(cases) - 1


# ------------------------------------------------------------------------- the launchers' choices


def test_window_split_follows_the_occupancy(monkeypatch):
    monkeypatch.setattr(W, "sm_count", lambda device: 132)
    monkeypatch.setattr(W, "_INTERPRETED", False)
    dev = torch.device("cuda")
    assert W._windows_per_program(4096, 3, dev, False) == 11  # old: 8 per SM → 1119 programs, 4.2 waves of 2
    assert W._windows_per_program(4096, 3, dev, False, resident=2) == 47  # 264 programs
    assert W._windows_per_program(4096, 3, dev, False, resident=3) == 32  # 384 programs = 3 × 132
    assert W._windows_per_program(4096, 3, dev, True, resident=3) == 2  # the interpreter's fixed config
    monkeypatch.setattr(W, "WINDOWS_PER_PROGRAM", 5)
    assert W._windows_per_program(4096, 3, dev, False, resident=3) == 5


def test_sr_and_xca_chunks_follow_the_occupancy(monkeypatch):
    monkeypatch.setattr(S, "sm_count", lambda device: 132)
    monkeypatch.setattr(X, "sm_count", lambda device: 132)
    dev = torch.device("cuda")
    # SegFormer-B2 512 px stage 1, batch 8 (1 head): N = 16384
    assert S._rows_per_program(16384, 8, dev, False, 64, 4) == 256  # old: 66 chunks → 64 of 256 rows
    assert S._rows_per_program(16384, 8, dev, False, 64, 4, resident=2) == 512  # 33 slots → 32 chunks
    assert S._rows_per_program(16384, 8, dev, False, 64, 4, resident=1) == 1024  # 16 chunks: 128 programs
    assert S._split_rows(16384, 8, dev, False, 16) == 1024 == S._split_rows(16384, 8, dev, False, 16, 1)
    assert S._split_rows(16384, 8, dev, False, 16, resident=2) == 512
    # XCiT-S12 at batch 64 (8 heads, 196 tokens): b·heads = 512 fills any occupancy, one pass
    assert X._rows_per_program(196, 512, dev, False) == 196 == X._rows_per_program(196, 512, dev, False, 3)
    # batch 4: 32 heads; old ⌈264 / 32⌉ = 9 → capped at ⌈196 / 128⌉ = 2 chunks
    assert X._rows_per_program(196, 32, dev, False) == 98 == X._rows_per_program(196, 32, dev, False, 1)
    assert X._rows_per_program(1000, 32, dev, False, resident=1) == 250  # ⌊132 / 32⌋ = 4 chunks
    assert X._rows_per_program(1000, 32, dev, False) == 125  # old: ⌈264 / 32⌉ = 9 → 8 of 125


def test_fixed_flag_never_reads_the_occupancy(monkeypatch):
    monkeypatch.setenv("VITKERNELS_GRID", "fixed")
    _gpu_path(monkeypatch, occupancy=lambda *a: pytest.fail("occupancy read under VITKERNELS_GRID=fixed"))
    with vk.use_backend("triton"):
        for op in ("window", "sr", "xca"):
            _run(op, torch.float32, backward=True)


# --------------------------------------------------------------- results do not depend on the grid


def _gpu_path(monkeypatch, occupancy, sms=4):
    """The launchers' GPU path (tuned kernels, config 0 of every tuner) with a mocked occupancy; on
    CPU tensors in the interpreter."""
    if _INTERPRET:
        ConfigForcer(0).install(monkeypatch.setattr)
    for mod in (W, S, X):
        monkeypatch.setattr(mod, "use_fixed", lambda t, interpreted, what: False)
        monkeypatch.setattr(mod, "sm_count", lambda device: sms)
        monkeypatch.setattr(mod, "occupancy", occupancy)
    if _INTERPRET:
        monkeypatch.setattr(W, "_INTERPRETED", False)  # size windows per program as on a GPU


def _run(op, dtype, backward):
    """Output and gradients of one small call of ``op``."""
    g = torch.Generator().manual_seed(1)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)

    if op == "window":  # 2 images × 4 windows × 2 heads, shifted, padded map, table + qkv_bias
        x, t, b = rnd(2, 11 * 12, 3 * 32), rnd(169, 2), rnd(3 * 32)
        leaves = [x, t, b]
        fn = lambda x, t, b: vk.window_attention(x, (11, 12), 2, 7, 3, t, b)  # noqa: E731
    elif op == "sr":  # N = 300 rows of 2 heads against M = 49 keys
        q, kv = rnd(2, 300, 64), rnd(2, 49, 128)
        leaves = [q, kv]
        fn = lambda q, kv: vk.sr_attention(q, kv, 2)  # noqa: E731
    else:  # xca: 300 tokens of 2 heads, D = 16
        x, tau = rnd(2, 300, 3 * 32), rnd(2, 1, 1).abs() + 0.5
        leaves = [x, tau]
        fn = lambda x, t: vk.xca(x, 2, t)  # noqa: E731
    leaves = [t.requires_grad_() for t in leaves]
    out = fn(*leaves)
    if not backward:
        return [out.detach()]
    cot = torch.randn(out.shape, generator=g).to(device=DEVICE, dtype=dtype)
    return [out.detach(), *torch.autograd.grad(out, leaves, cot)]


def _spy(mod, name, seen):
    real = getattr(mod, name)

    def wrapped(*args, **kwargs):
        got = real(*args, **kwargs)
        seen.append(got)
        return got

    return wrapped


@pytest.mark.parametrize("op", ["window", "sr", "xca"])
def test_results_do_not_depend_on_the_grid(monkeypatch, op):
    """One to three resident programs per SM on a 4-SM "GPU" give different program counts; the
    forward is bitwise the same (window, sr: every row is computed alone; xca sums per-chunk
    partials, so only within rounding), the gradients agree within rounding and repeat bitwise."""
    dtype = torch.float32
    results, splits = {}, {}
    for resident in (1, 2, 3):
        calls = []
        _gpu_path(
            monkeypatch, lambda tuned, args, kwargs, device, signature=None, r=resident, c=calls: c.append(kwargs) or r
        )
        seen = []
        mod, name = {
            "window": (W, "_windows_per_program"),
            "sr": (S, "_rows_per_program"),
            "xca": (X, "_rows_per_program"),
        }[op]
        monkeypatch.setattr(mod, name, _spy(mod, name, seen))
        with vk.use_backend("triton"):
            first = _run(op, dtype, backward=True)
            again = _run(op, dtype, backward=True)
        assert calls, "the launcher did not ask for the occupancy"
        for a, b in zip(first, again):
            assert torch.equal(a, b), f"{op} not deterministic at {resident} programs per SM"
        results[resident], splits[resident] = first, seen[-1]
        monkeypatch.undo()
    assert len(set(splits.values())) >= 2, f"the occupancy did not change the {op} grid: {splits}"
    for resident in (2, 3):
        out, ref = results[resident][0], results[1][0]
        if op == "xca":
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(out, ref), f"{op} forward changed with the grid"
        for got, want in zip(results[resident][1:], results[1][1:]):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
