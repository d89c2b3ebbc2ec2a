"""GPU tests of the compiled CUDA window-attention forward,
`torch.ops.vitkernels_C.window_attention_fwd`, and of the "cuda" backend of vk.window_attention.

Pass rule (tests/helpers.py): error vs the float64 CPU reference <= 2 x the error of the
same-precision eager reference composition on the GPU + a small floor. Skipped without a CUDA GPU
(conftest) or when the extension cannot be built/loaded (VITKERNELS_REQUIRE_CUDA_EXT=1 makes that a
failure).

The options of SPEC op 3 (shift_first: timm's shift-then-pad order; logit_scale: Swin V2 cosine
attention) run through the same rule, alone and together, on odd padded maps, with a head whose
logit scale is clamped at ln 100, without table / qkv_bias, with strided inputs and in both thread
orders of the emulator; and through the op layer's "cuda" backend with the "auto" backward.

Every kernel test runs both kernel versions (fixture `wa`: the op's `version` argument, 0 = v2, the
default: two windows per 8-warp CTA, Q loaded before the K/V barrier; 1 = v1: one window per 4-warp
CTA), including grids whose last v2 CTA has an idle second half (an odd number of window-heads).
"""

import pytest
import torch

import vitkernels as vk
from vitkernels import reference as ref

from helpers import assert_within

# On a GPU every test here is a GPU test, so `pytest -m gpu` (bench/gpu_suite.sh) runs them all there.
pytestmark = [pytest.mark.gpu] if torch.cuda.is_available() else []

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (B, H, W, C, heads, M, s)
SHAPES = [
    (2, 56, 56, 96, 3, 7, 3),  # Swin-T stage 1 (D = 32), shifted
    (2, 28, 28, 192, 6, 7, 0),  # Swin-T stage 2
    (2, 14, 14, 384, 12, 7, 3),  # Swin-T stage 3
    (2, 7, 7, 768, 24, 7, 0),  # Swin-T stage 4 (one window)
    (1, 96, 96, 128, 4, 12, 6),  # Swin-B 384 stage 1 (M = 12, N = 144)
    (1, 12, 12, 1024, 32, 12, 0),  # Swin-B 384 stage 4
    (2, 50, 38, 96, 3, 7, 3),  # odd map: padding + shift
    (1, 13, 9, 64, 1, 5, 2),  # odd map, D = 64, N = 25
    (1, 17, 20, 128, 1, 16, 7),  # M = 16 (N = 256), D = 128, padding + shift
    (1, 9, 11, 120, 3, 4, 1),  # D = 40 (padded head dim), N = 16; 27 items: v2's last CTA half idle
    (1, 19, 15, 96, 3, 7, 2),  # Swin-T D = 32, padded + shifted, 27 items (odd)
]


class Versioned:
    """`ops` with window_attention_fwd pinned to one kernel version (the op's `version` argument)."""

    def __init__(self, ops, version):
        self.ops = ops
        self.version = version

    def __getattr__(self, name):
        return getattr(self.ops, name)

    def window_attention_fwd(self, *args):
        if self.version == 0:  # the schema's default: the newest kernels
            return self.ops.window_attention_fwd(*args)
        return self.ops.window_attention_fwd(*args, version=self.version)


@pytest.fixture(params=[0, 1], ids=["v2", "v1"])
def wa(request, ops):
    return Versioned(ops, request.param)


def items(b, h, w, heads, m):
    """B·nW·heads: the (batch, window, head) items; v2 runs two per CTA (D <= 96)."""
    return b * (-(-h // m)) * (-(-w // m)) * heads


def make(b, h, w, c, heads, m, table, qkv_bias, dtype, device):
    qkv = torch.randn(b, h * w, 3 * c, device=device, dtype=dtype)
    tab = torch.randn((2 * m - 1) ** 2, heads, device=device, dtype=dtype) if table else None
    bias = torch.randn(3 * c, device=device, dtype=dtype) if qkv_bias else None
    return qkv, tab, bias


def logit_scale(heads, dtype, device, shape="h11"):
    """Around Swin V2's init ln 10; with several heads, head 0 is past ln 100 (clamped to τ = 100)."""
    ls = torch.randn(heads) * 0.5 + 2.3
    if heads > 1:
        ls[0] = 4.9
    return (ls.reshape(heads, 1, 1) if shape == "h11" else ls).to(device=device, dtype=dtype)


def check(ops, shape, dtype, table=True, qkv_bias=True, scale=None, shift_first=False, cosine=False, oracle=None):
    b, h, w, c, heads, m, s = shape
    qkv, tab, bias = make(b, h, w, c, heads, m, table, qkv_bias, dtype, ops.device)
    ls = logit_scale(heads, dtype, ops.device) if cosine else None
    scale = (c // heads) ** -0.5 if scale is None else scale
    if cosine or shift_first:
        out = ops.window_attention_fwd(qkv, [h, w], heads, m, s, tab, bias, scale, ls, shift_first)
    else:  # the schema's defaults: the call an extension built before the options also takes
        out = ops.window_attention_fwd(qkv, [h, w], heads, m, s, tab, bias, scale)
    ops.sync()
    assert out.shape == (b, h * w, c) and out.dtype == dtype and out.is_contiguous()
    assert torch.isfinite(out).all()
    d64 = [None if t is None else t.double().cpu() for t in (qkv, tab, bias, ls)]
    if oracle is not None:  # the independent oracle (tests/oracles.py) instead of the package's reference
        want = oracle.window_attention(d64[0], (h, w), heads, m, s, d64[1], d64[2], scale, d64[3], shift_first)
    else:
        want = ref.window_attention(d64[0], (h, w), heads, m, s, d64[1], d64[2], scale, d64[3], shift_first)
    eager = ref.window_attention(qkv, (h, w), heads, m, s, tab, bias, scale, ls, shift_first)
    assert_within(
        f"window_attention_fwd {shape} {dtype} table={table} bias={qkv_bias} shift_first={shift_first} cosine={cosine}",
        out,
        eager,
        want,
        dtype,
    )
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda c: "B{}_{}x{}_C{}_h{}_M{}_s{}".format(*c))
def test_window_attention_fwd_matches_reference(wa, shape, dtype):
    check(wa, shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("table,qkv_bias", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize(
    "shape", [(2, 50, 38, 96, 3, 7, 3), (1, 30, 30, 64, 2, 12, 5)], ids=lambda c: "B{}_{}x{}_C{}_h{}_M{}_s{}".format(*c)
)
def test_optional_table_and_bias(wa, shape, dtype, table, qkv_bias):
    check(wa, shape, dtype, table=table, qkv_bias=qkv_bias)


# (shape, shift_first, cosine)
OPTION_CASES = [
    ((2, 50, 38, 96, 3, 7, 3), True, True),  # odd map: padding + shift, timm's order, Swin V2 attention
    ((1, 9, 13, 64, 2, 7, 3), True, False),  # timm's odd case, D = 32
    ((1, 5, 5, 32, 1, 7, 3), True, True),  # window bigger than the map: s > H, W
    ((1, 13, 9, 64, 1, 5, 2), False, True),  # cosine, pad-first order, N = 25
    ((1, 17, 20, 128, 1, 16, 7), True, True),  # M = 16 (N = 256), D = 128
    ((2, 14, 14, 96, 3, 7, 3), True, True),  # no padding: both orders are one function
    ((1, 9, 11, 120, 3, 4, 1), False, True),  # D = 40 (padded head dim)
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "case", OPTION_CASES, ids=lambda c: "B{}_{}x{}_C{}_h{}_M{}_s{}".format(*c[0]) + f"_sf{c[1]:d}_cos{c[2]:d}"
)
def test_options_match_reference(wa, case, dtype):
    shape, shift_first, cosine = case
    check(wa, shape, dtype, shift_first=shift_first, cosine=cosine)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_options_match_oracle(wa, dtype):
    """Against tests/oracles.py (explicit roll-free shift, pad, partition, F.normalize-free cosine)."""
    import oracles

    check(wa, (1, 9, 13, 32, 2, 7, 3), dtype, shift_first=True, cosine=True, oracle=oracles)


@pytest.mark.parametrize("table,qkv_bias", [(False, False), (True, False), (False, True)])
def test_options_without_table_or_bias(wa, table, qkv_bias):
    """Padded slots without qkv_bias are zero rows: q̂ = k̂ = 0 (F.normalize's eps)."""
    check(wa, (2, 50, 38, 96, 3, 7, 3), torch.float16, table=table, qkv_bias=qkv_bias, shift_first=True, cosine=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_options_strided_inputs(wa, dtype):
    """A strided qkv view, a strided table and a non-contiguous (heads,) logit_scale view."""
    b, h, w, c, heads, m, s = 2, 21, 19, 96, 3, 7, 3
    big = torch.randn(b, h * w, 4 * c, device=wa.device, dtype=dtype)
    qkv = big[..., c:]
    tab = torch.randn(2 * ((2 * m - 1) ** 2), heads, device=wa.device, dtype=dtype)[::2]
    bias = torch.randn(3 * c, device=wa.device, dtype=dtype)
    ls = logit_scale(heads, dtype, wa.device, "h").repeat_interleave(2)[::2]
    assert not ls.is_contiguous()
    out = wa.window_attention_fwd(qkv, [h, w], heads, m, s, tab, bias, 0.2, ls, True)
    want = ref.window_attention(
        qkv.contiguous(), (h, w), heads, m, s, tab.contiguous(), bias, 0.2, ls.contiguous(), True
    )
    wa.sync()
    tol = 3e-2 if dtype != torch.float32 else 1e-5
    assert (out.float() - want.float()).abs().max().item() <= tol * max(1.0, want.abs().max().item())


def test_options_errors(ops):
    qkv = torch.randn(1, 49, 96, device=ops.device, dtype=torch.float16)
    with pytest.raises(RuntimeError, match=r"logit_scale must be \(heads,\) or \(heads, 1, 1\) with heads = 2"):
        ops.window_attention_fwd(
            qkv, [7, 7], 2, 7, 3, None, None, 0.2, torch.zeros(3, device=ops.device, dtype=torch.float16), False
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_options_reverse_thread_order(wa, reverse_thread_order, dtype):
    check(wa, (2, 50, 38, 96, 3, 7, 3), dtype, shift_first=True, cosine=True)


def test_cuda_backend_options_forward_and_auto_backward(cuda_backend):
    """vk.window_attention with both options forced onto "cuda": the forward runs the C++ kernel, the
    backward the "auto" choice; grads reach qkv, table, qkv_bias and logit_scale (0 on the clamped head)."""
    from vitkernels import backends

    b, h, w, c, heads, m, s = 2, 9, 13, 96, 3, 7, 3
    qkv, tab, bias = make(b, h, w, c, heads, m, True, True, torch.float16, cuda_backend)
    ls = logit_scale(heads, torch.float16, cuda_backend)
    calls = []
    real_select = backends.select

    def spy(*args, **kwargs):
        kernel = real_select(*args, **kwargs)
        calls.append((kwargs.get("backward", False), kernel.backend))
        return kernel

    leaves = [t.detach().requires_grad_() for t in (qkv, tab, bias, ls)]
    with vk.use_backend("cuda"), pytest.MonkeyPatch.context() as mp:
        assert not vk.not_supported_reasons(
            "window_attention", "cuda", qkv, [h, w], heads, m, s, tab, bias, 0.1, ls, True
        )
        mp.setattr(backends, "select", spy)
        out = vk.window_attention(leaves[0], (h, w), heads, m, s, leaves[1], leaves[2], None, leaves[3], True)
    out.float().square().sum().backward()
    assert (False, "cuda") in calls, calls
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)
    assert leaves[3].grad.shape == ls.shape and leaves[3].grad[0].item() == 0
    want = ref.window_attention(qkv.float(), (h, w), heads, m, s, tab.float(), bias.float(), None, ls.float(), True)
    assert (out.float() - want).abs().max().item() <= 2e-2 * max(1.0, want.abs().max().item())


def test_cuda_backend_option_reasons(ops, monkeypatch):
    """An extension built before the options lacks them in its schema: "cuda" then declines them
    (with a reason saying to rebuild), and still runs the default path."""
    import importlib

    wa = importlib.import_module("vitkernels.ops.window_attention")

    class _Arg:
        def __init__(self, name):
            self.name = name

    class _Schema:
        arguments = [
            _Arg(n) for n in ("qkv", "hw", "num_heads", "window_size", "shift_size", "table", "qkv_bias", "scale")
        ]

    class _Op:
        class default:  # noqa: N801
            _schema = _Schema()

    class _Ns:
        window_attention_fwd = _Op

    assert wa.cuda_window_option_reasons(None, False) == []
    assert wa.cuda_window_option_reasons(torch.zeros(2), True) == []
    monkeypatch.setattr(torch.ops, "vitkernels_C", _Ns(), raising=False)
    assert wa.cuda_window_option_reasons(None, False) == []
    assert "rebuild" in wa.cuda_window_option_reasons(torch.zeros(2), False)[0]
    assert "rebuild" in wa.cuda_window_option_reasons(None, True)[0]


@pytest.mark.gpu
def test_many_windows(wa):
    """B·nW·heads = 1040·64·1 = 66,560 > 65,535 CTAs on the 1-D grid (checked on a few batches)."""
    b, h, w, c, heads, m, s = 1040, 56, 56, 32, 1, 7, 3
    qkv, tab, bias = make(b, h, w, c, heads, m, True, True, torch.bfloat16, wa.device)
    out = wa.window_attention_fwd(qkv, [h, w], heads, m, s, tab, bias, 32**-0.5)
    wa.sync()
    for i in (0, 517, b - 1):
        want = ref.window_attention(qkv[i : i + 1].float(), (h, w), heads, m, s, tab.float(), bias.float(), 32**-0.5)
        assert (out[i : i + 1].float() - want).abs().max().item() <= 3e-2 * max(1.0, want.abs().max().item())


def test_many_small_windows(wa):
    """257·256 = 65,792 > 65,535 windows of 2×2 (513×511 padded, shifted, with table and qkv_bias), one
    CTA each: cheap enough for the emulator, so CPU CI covers the 1-D grid's index math past 16 bits."""
    b, h, w, c, heads, m, s = 1, 513, 511, 8, 1, 2, 1
    assert b * (-(-h // m)) * (-(-w // m)) * heads > 65535
    check(wa, (b, h, w, c, heads, m, s), torch.float16, scale=0.3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_qkv(wa, dtype):
    b, h, w, c, heads, m, s = 2, 21, 19, 96, 3, 7, 3
    big = torch.randn(b, h * w, 4 * c, device=wa.device, dtype=dtype)
    qkv = big[..., c:]  # token stride 4C, 16-byte aligned: read in place
    tab = torch.randn(2 * ((2 * m - 1) ** 2), heads, device=wa.device, dtype=dtype)[::2]  # strided table
    bias = torch.randn(3 * c, device=wa.device, dtype=dtype)
    out = wa.window_attention_fwd(qkv, [h, w], heads, m, s, tab, bias, 0.2)
    want = ref.window_attention(qkv.contiguous(), (h, w), heads, m, s, tab.contiguous(), bias, 0.2)
    wa.sync()
    tol = 2e-2 if dtype != torch.float32 else 1e-5
    assert (out.float() - want.float()).abs().max().item() <= tol * max(1.0, want.abs().max().item())


def test_supports_query(ops):
    assert ops.window_attention_supports(7, 32) and ops.window_attention_supports(16, 128)
    assert not ops.window_attention_supports(17, 32)
    assert not ops.window_attention_supports(7, 36) and not ops.window_attention_supports(7, 136)
    # the shared query shape: (window, head_dim, dtype=None, device=None)
    assert ops.window_attention_supports(7, 32, torch.float16, torch.device(ops.device))
    assert ops.window_attention_supports(12, 128, torch.float32)
    assert not ops.window_attention_supports(7, 32, torch.float64)
    assert not ops.window_attention_supports(0, 32) and not ops.window_attention_supports(7, 0)


def test_unsupported_window_raises(ops):
    qkv = torch.randn(1, 17 * 17, 96, device=ops.device, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="not supported"):
        ops.window_attention_fwd(qkv, [17, 17], 1, 17, 0, None, None, 0.2)


@pytest.mark.parametrize("switch", ["auto", "v1"])
def test_cuda_backend_forward_and_auto_backward(cuda_backend, monkeypatch, switch):
    monkeypatch.setenv("VITKERNELS_WINDOW_CUDA_KERNEL", switch)
    b, h, w, c, heads, m, s = 2, 14, 14, 96, 3, 7, 3
    qkv, tab, bias = make(b, h, w, c, heads, m, True, True, torch.float16, cuda_backend)
    leaves = [t.detach().requires_grad_() for t in (qkv, tab, bias)]
    with vk.use_backend("cuda"):
        out = vk.window_attention(leaves[0], (h, w), heads, m, s, leaves[1], leaves[2])
    out.float().square().sum().backward()  # backward runs on the "auto" choice
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)
    want = ref.window_attention(qkv.float(), (h, w), heads, m, s, tab.float(), bias.float(), (c // heads) ** -0.5)
    assert (out.float() - want).abs().max().item() <= 2e-2 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reverse_thread_order(wa, reverse_thread_order, dtype):
    check(wa, (2, 50, 38, 96, 3, 7, 3), dtype)
    check(wa, (1, 30, 30, 64, 2, 12, 5), dtype)
    check(wa, (1, 19, 15, 96, 3, 7, 2), dtype)  # 27 items: v2's last CTA has an idle half


def test_version_argument(ops):
    """version 0 (the default) and 1 agree to rounding; anything else is refused by the glue."""
    b, h, w, c, heads, m, s = 1, 19, 15, 96, 3, 7, 2
    assert items(b, h, w, heads, m) % 2 == 1
    qkv, tab, bias = make(b, h, w, c, heads, m, True, True, torch.float16, ops.device)
    outs = [ops.window_attention_fwd(qkv, [h, w], heads, m, s, tab, bias, 0.2, version=v) for v in (0, 1)]
    default = ops.window_attention_fwd(qkv, [h, w], heads, m, s, tab, bias, 0.2)
    ops.sync()
    assert torch.equal(default, outs[0])
    assert (outs[0].float() - outs[1].float()).abs().max().item() <= 1e-2
    with pytest.raises(RuntimeError, match="version must be 0"):
        ops.window_attention_fwd(qkv, [h, w], heads, m, s, tab, bias, 0.2, version=2)


def test_cuda_kernel_switch(ops, monkeypatch):
    """VITKERNELS_WINDOW_CUDA_KERNEL: "auto" calls the op with the schema's default version (v2), "v1"
    with version=1, anything else is a ValueError; an extension without `version` runs v1 anyway."""
    import importlib

    wa_mod = importlib.import_module("vitkernels.ops.window_attention")
    real = torch.ops.vitkernels_C
    seen = []

    class _Spy:
        default = real.window_attention_fwd.default

        def __call__(self, *args, **kwargs):
            seen.append(kwargs.get("version"))
            return real.window_attention_fwd(*args, **kwargs)

    class _Ns:
        window_attention_fwd = _Spy()

        def __getattr__(self, name):
            return getattr(real, name)

    b, h, w, c, heads, m, s = 1, 9, 11, 64, 2, 7, 3
    qkv, tab, bias = make(b, h, w, c, heads, m, True, True, torch.float16, ops.device)
    args = (qkv, (h, w), heads, m, s, tab, bias, 0.125)
    monkeypatch.setattr(torch.ops, "vitkernels_C", _Ns(), raising=False)
    for switch, want in (("auto", None), ("v1", 1)):
        monkeypatch.setenv("VITKERNELS_WINDOW_CUDA_KERNEL", switch)
        assert wa_mod.cuda_kernel_version() == (want or 0)
        for opts in ((), (logit_scale(heads, torch.float16, ops.device), True)):
            seen.clear()
            out = wa_mod._cuda_forward(*args, *opts)
            assert seen == [want] and out.shape == (b, h * w, c)
    monkeypatch.setenv("VITKERNELS_WINDOW_CUDA_KERNEL", "v2")
    with pytest.raises(ValueError, match=r"VITKERNELS_WINDOW_CUDA_KERNEL='v2': expected one of auto, v1"):
        wa_mod.cuda_kernel_version()
    with pytest.raises(ValueError, match="VITKERNELS_WINDOW_CUDA_KERNEL"):
        wa_mod._cuda_forward(*args)
    monkeypatch.setenv("VITKERNELS_WINDOW_CUDA_KERNEL", "v1")
    monkeypatch.setattr(wa_mod, "_cuda_has_version_arg", lambda: False)
    seen.clear()
    wa_mod._cuda_forward(*args)
    assert seen == [None]


@pytest.mark.parametrize("cosine", [False, True])
def test_two_windows_past_the_shared_memory_optin(wa, monkeypatch, cosine):
    """Under A100's 163 KiB opt-in (emulated), two M = 16, D = 96 windows (220 KiB) do not fit in one
    CTA: v2 runs v1 for that call. (On a GPU: the device's own limit.)"""
    monkeypatch.setenv("VKEMU_SMEM_OPTIN", str(163 * 1024))
    check(wa, (1, 17, 20, 96, 1, 16, 7), torch.bfloat16, shift_first=cosine, cosine=cosine)
