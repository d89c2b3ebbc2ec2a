"""window_attention (Swin W-MSA / SW-MSA): the fused Triton kernels against the float64 oracle.

CPU: the Triton kernels run in the interpreter (TRITON_INTERPRET=1, set by conftest.py on CPU builds
of torch) in float32 and float16; GPU tests (marked gpu) add bfloat16 and real Swin shapes.
Oracle: tests/oracles.window_attention (explicit pad, shift, partition, (nW, N, N) mask) in float64
on CPU, with autograd for the gradients. Eager: the same timm-style composition run in the tested
dtype. Rule: helpers.assert_within (fused error <= 2 x eager error + floor) for out and the grads
of qkv, rel_pos_bias_table and qkv_bias (and logit_scale).

The two options of SPEC op 3 run through the same checks: shift_first (timm's shift-then-pad order)
and logit_scale (Swin V2 cosine attention, with a head clamped at ln 100 whose gradient must be 0),
alone and together, on odd padded maps, with and without table / qkv_bias, on the multi-block
tilings; plus the package's reference against the oracle in float64 and the op under autocast.
"""

import pytest
import torch

import vitkernels as vk
from vitkernels import _env
from vitkernels.backends import BackendUnavailableError

import oracles
from helpers import assert_within, device_marks, grads

_INTERPRET = _env.enabled("TRITON_INTERPRET")
_CAN_RUN = _INTERPRET or torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not _CAN_RUN, reason="Triton kernels need a CUDA GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), *device_marks(DEVICE)]
CPU_DTYPES = [torch.float32, torch.float16]


def _kernels():
    from vitkernels.triton import window_attention as K

    return K


def _make(b, h, w, c, heads, m, table, qkv_bias, scale_table=1.0):
    qkv = torch.randn(b, h * w, 3 * c, dtype=torch.float64)
    tab = torch.randn((2 * m - 1) ** 2, heads, dtype=torch.float64) * scale_table if table else None
    bias = torch.randn(3 * c, dtype=torch.float64) if qkv_bias else None
    return qkv, tab, bias


def _logit_scale(heads, shape="h11"):
    """Swin V2 logit scales around its init ln 10; with several heads, head 0 is past ln 100 (clamped)."""
    ls = torch.randn(heads, dtype=torch.float64) * 0.5 + 2.3
    if heads > 1:
        ls[0] = 4.9
    return ls.reshape(heads, 1, 1) if shape == "h11" else ls


def check_case(
    b,
    h,
    w,
    c,
    heads,
    m,
    s,
    table=True,
    qkv_bias=True,
    dtype=torch.float32,
    device=DEVICE,
    scale=None,
    shift_first=False,
    cosine=False,
    ls_shape="h11",
):
    qkv, tab, bias = _make(b, h, w, c, heads, m, table, qkv_bias)
    ls = _logit_scale(heads, ls_shape) if cosine else None
    hw = (h, w)

    def oracle_fn(x, t, bb, lsc):
        return oracles.window_attention(x, hw, heads, m, s, t, bb, scale, lsc, shift_first)

    def fused_fn(x, t, bb, lsc):
        return vk.window_attention(x, hw, heads, m, s, t, bb, scale, lsc, shift_first)

    inputs64 = [qkv, tab, bias, ls]
    cot = torch.randn(b, h * w, c, dtype=torch.float64)
    oracle = grads(oracle_fn, inputs64, cot)
    low = [None if t is None else t.to(device=device, dtype=dtype) for t in inputs64]
    eager = grads(oracle_fn, low, cot.to(device))
    with vk.use_backend("triton"):
        fused = grads(fused_fn, low, cot.to(device))
    names = (
        ["out", "dqkv"]
        + (["dtable"] if table else [])
        + (["dqkv_bias"] if qkv_bias else [])
        + (["dlogit_scale"] if cosine else [])
    )
    for name, f, e, o in zip(names, fused, eager, oracle):
        assert f.dtype == dtype, name
        assert_within(
            f"triton {dtype} {name} (B={b}, {h}x{w}, C={c}, heads={heads}, M={m}, s={s}, "
            f"shift_first={shift_first}, cosine={cosine})",
            f,
            e,
            o,
            dtype,
        )
    if cosine:
        dls = fused[-1]
        assert dls.shape == ls.shape
        if heads > 1:
            assert dls.reshape(-1)[0].item() == 0.0, "the clamped head's logit_scale must get no gradient"
            assert (dls.reshape(-1)[1:] != 0).all()


# B, H, W, C, heads, M, s
CASES = [
    (1, 7, 7, 16, 2, 7, 0),  # one window, no padding
    (2, 14, 14, 48, 3, 7, 3),  # SW-MSA, 4 windows, D = 16
    (1, 9, 11, 24, 3, 4, 2),  # padding on both sides, D = 8
    (2, 5, 6, 32, 1, 3, 1),  # odd sizes, D = 32
    (1, 3, 3, 16, 2, 1, 0),  # M = 1: every window is one token
    (1, 8, 8, 64, 2, 12, 0),  # single padded window, N = 144 (> 128), D = 32
]


@needs_triton
@pytest.mark.parametrize(
    "dtype", CPU_DTYPES if not torch.cuda.is_available() else [torch.float32, torch.float16, torch.bfloat16], ids=str
)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_{}x{}_C{}_h{}_M{}_s{}".format(*c))
def test_window_attention_vs_oracle(case, dtype):
    check_case(*case, dtype=dtype)


@needs_triton
@pytest.mark.parametrize("table,qkv_bias", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("case", [(1, 9, 11, 24, 3, 4, 2), (1, 8, 8, 32, 1, 12, 5)], ids=["9x11_M4_s2", "8x8_M12_s5"])
def test_optional_table_and_bias(case, table, qkv_bias):
    check_case(*case, table=table, qkv_bias=qkv_bias, dtype=torch.float32)


@needs_triton
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_head_dim_64_and_scale(dtype):
    check_case(1, 6, 5, 128, 2, 3, 1, dtype=dtype, scale=0.3)


@needs_triton
def test_48_heads():
    check_case(1, 3, 2, 48 * 32, 48, 2, 1, dtype=torch.float32)  # Swin-L stage 4's 48 heads of D = 32, padded + shifted


@needs_triton
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_non_power_of_two_head_dim(dtype):
    check_case(1, 5, 5, 36, 3, 3, 2, dtype=dtype)  # D = 12 -> BLOCK_D 16, masked columns


@needs_triton
@pytest.mark.parametrize(
    "blocks",
    [
        {"fwd": (16, 16), "bwd": 16, "bwd_keys": None, "wpg": 1},  # query and key blocks (fwd online softmax)
        {"fwd": (16, 32), "bwd": 16, "bwd_keys": 16, "wpg": 3},  # backward key blocks: lse + out + dq workspace
    ],
    ids=["query_blocks", "key_blocks"],
)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_multi_block_paths(monkeypatch, blocks, dtype):
    """The tilings a GPU picks for large windows (M = 12, M >= 17), forced at a small shape."""
    if not _INTERPRET:
        pytest.skip("the fixed interpreter tiling is only used under TRITON_INTERPRET=1")
    K = _kernels()
    monkeypatch.setitem(K.INTERPRET_BLOCKS, "fwd", blocks["fwd"])
    monkeypatch.setitem(K.INTERPRET_BLOCKS, "bwd", blocks["bwd"])
    monkeypatch.setitem(K.INTERPRET_BLOCKS, "bwd_keys", blocks["bwd_keys"])
    monkeypatch.setattr(K, "WINDOWS_PER_PROGRAM", blocks["wpg"])
    check_case(1, 9, 6, 32, 2, 5, 2, dtype=dtype)  # N = 25: two 16-slot blocks, padded slots


@needs_triton
@pytest.mark.parametrize("wpg", [1, 4])
def test_windows_per_program(monkeypatch, wpg):
    """Programs walking several windows (across an image boundary) give the same result."""
    monkeypatch.setattr(_kernels(), "WINDOWS_PER_PROGRAM", wpg)
    check_case(3, 6, 7, 16, 2, 3, 1, dtype=torch.float32)  # 3 images x 6 windows, groups cross images


# ----------------------------------------------------------------------------- shift_first / logit_scale

# B, H, W, C, heads, M, s, shift_first, cosine
OPTION_CASES = [
    (2, 9, 13, 32, 2, 7, 3, True, True),  # timm's odd Swin case: padding right and bottom, both options
    (1, 9, 11, 24, 3, 4, 2, False, True),  # cosine alone, pad-first order, D = 8
    (1, 5, 5, 16, 2, 7, 3, True, False),  # window bigger than the map: s > H, W wraps more than once
    (1, 9, 11, 24, 3, 4, 2, True, False),  # shift first alone
    (2, 8, 8, 32, 2, 4, 2, True, True),  # no padding: both orders agree
    (1, 6, 7, 16, 1, 3, 0, False, True),  # cosine, no shift, one head
]
# On CPU the first two cases run in float16 too (the interpreter's time is the limit); a GPU runs
# every case in every dtype.
OPTION_PARAMS = [
    (case, dtype)
    for i, case in enumerate(OPTION_CASES)
    for dtype in (
        [torch.float32, torch.float16, torch.bfloat16]
        if torch.cuda.is_available()
        else CPU_DTYPES
        if i < 2
        else [torch.float32]
    )
]


@needs_triton
@pytest.mark.parametrize(
    "case,dtype",
    OPTION_PARAMS,
    ids=["B{}_{}x{}_C{}_h{}_M{}_s{}_sf{:d}_cos{:d}".format(*c) + f"-{d}" for c, d in OPTION_PARAMS],
)
def test_options_vs_oracle(case, dtype):
    *shape, shift_first, cosine = case
    check_case(*shape, dtype=dtype, shift_first=shift_first, cosine=cosine)


@needs_triton
@pytest.mark.parametrize("table,qkv_bias,ls_shape", [(False, False, "h"), (True, False, "h11")])
def test_options_without_table_or_bias(table, qkv_bias, ls_shape):
    """Padded slots without qkv_bias are zero vectors: q̂ = k̂ = 0 (F.normalize's eps), finite grads."""
    check_case(1, 9, 11, 24, 3, 4, 2, table=table, qkv_bias=qkv_bias, shift_first=True, cosine=True, ls_shape=ls_shape)


@needs_triton
def test_options_large_window():
    check_case(1, 8, 8, 64, 2, 12, 5, dtype=torch.float32, shift_first=True, cosine=True)  # N = 144, padded


@needs_triton
@pytest.mark.parametrize(
    "blocks",
    [
        {"fwd": (16, 16), "bwd": 16, "bwd_keys": None, "wpg": 1},
        {"fwd": (16, 32), "bwd": 16, "bwd_keys": 16, "wpg": 3},  # key blocks: dq̂ in the workspace
    ],
    ids=["query_blocks", "key_blocks"],
)
def test_options_multi_block_paths(monkeypatch, blocks):
    if not _INTERPRET:
        pytest.skip("the fixed interpreter tiling is only used under TRITON_INTERPRET=1")
    K = _kernels()
    monkeypatch.setitem(K.INTERPRET_BLOCKS, "fwd", blocks["fwd"])
    monkeypatch.setitem(K.INTERPRET_BLOCKS, "bwd", blocks["bwd"])
    monkeypatch.setitem(K.INTERPRET_BLOCKS, "bwd_keys", blocks["bwd_keys"])
    monkeypatch.setattr(K, "WINDOWS_PER_PROGRAM", blocks["wpg"])
    check_case(2, 9, 6, 32, 2, 5, 2, dtype=torch.float32, shift_first=True, cosine=True)


@needs_triton
def test_cosine_large_logit_scale_fp16():
    """τ = 100 on every head (all clamped): scores span ±100 + bias, the fp16 path stays within the rule."""
    qkv, tab, bias = _make(1, 7, 9, 32, 2, 4, True, True)
    ls = torch.full((2,), 6.0, dtype=torch.float64, requires_grad=True)
    leaves = [t.half().detach().requires_grad_() for t in (qkv, tab, bias, ls)]
    with vk.use_backend("triton"):
        out = vk.window_attention(
            leaves[0], (7, 9), 2, 4, 2, leaves[1], leaves[2], logit_scale=leaves[3], shift_first=True
        )
    out.float().square().sum().backward()
    want = oracles.window_attention(qkv, (7, 9), 2, 4, 2, tab, bias, logit_scale=ls.detach(), shift_first=True)
    eager = oracles.window_attention(
        *[t.half() for t in (qkv,)],
        (7, 9),
        2,
        4,
        2,
        tab.half(),
        bias.half(),
        logit_scale=ls.detach().half(),
        shift_first=True,
    )
    assert_within("fp16 out, tau = 100", out.detach(), eager, want, torch.float16)
    assert (leaves[3].grad == 0).all() and torch.isfinite(leaves[0].grad).all()


@needs_triton
def test_options_deterministic():
    qkv, tab, bias = (t.float().to(DEVICE) for t in _make(2, 9, 10, 32, 2, 4, True, True))
    ls = _logit_scale(2).float().to(DEVICE)
    cot = torch.randn(2, 90, 32, device=DEVICE)

    def run():
        leaves = [t.detach().clone().requires_grad_() for t in (qkv, tab, bias, ls)]
        with vk.use_backend("triton"):
            out = vk.window_attention(leaves[0], (9, 10), 2, 4, 2, leaves[1], leaves[2], None, leaves[3], True)
        out.backward(cot)
        return [out.detach()] + [t.grad for t in leaves]

    first = run()
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        det = run()
    finally:
        torch.use_deterministic_algorithms(was)
    for a, b_ in zip(first, det):
        assert torch.equal(a, b_)


# B, H, W, heads, D, M, s
REF_CASES = [(2, 9, 13, 2, 3, 7, 3), (1, 5, 5, 2, 2, 7, 3), (1, 7, 9, 3, 2, 4, 2), (1, 6, 6, 2, 2, 3, 0)]


@pytest.mark.parametrize("case", REF_CASES, ids=lambda c: "B{}_{}x{}_h{}_D{}_M{}_s{}".format(*c))
@pytest.mark.parametrize(
    "shift_first,cosine", [(True, False), (False, True), (True, True)], ids=["shift_first", "cosine", "both"]
)
def test_reference_options_vs_oracle(case, shift_first, cosine):
    """The package's reference backend (float64) against the independent oracle, to 1e-10: outputs and
    the gradients of qkv, table, qkv_bias and logit_scale (the clamped head's is exactly 0)."""
    b, h, w, heads, d, m, s = case
    qkv, tab, bias = _make(b, h, w, heads * d, heads, m, True, True)
    ls = _logit_scale(heads, "h") if cosine else None
    cot = torch.randn(b, h * w, heads * d, dtype=torch.float64)
    want = grads(
        lambda *a: oracles.window_attention(a[0], (h, w), heads, m, s, a[1], a[2], 0.7, a[3], shift_first),
        [qkv, tab, bias, ls],
        cot,
    )
    with vk.use_backend("reference"):
        got = grads(
            lambda *a: vk.window_attention(a[0], (h, w), heads, m, s, a[1], a[2], 0.7, a[3], shift_first),
            [qkv, tab, bias, ls],
            cot,
        )
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, atol=1e-10, rtol=1e-10)
    if cosine:
        assert got[-1][0].item() == 0.0


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_options_under_autocast(backend):
    """float32 qkv, table, qkv_bias and logit_scale under autocast(float16): the op runs in float16
    (logit_scale cast too), its output is float16, every grad has its input's float32 dtype, and out and
    grads are within the rule of the eager composition under the same autocast."""
    if backend == "triton" and not (_INTERPRET and DEVICE == "cpu"):
        pytest.skip("the CPU leg of the Triton autocast test")
    qkv, tab, bias = (t.float() for t in _make(2, 5, 7, 16, 2, 3, True, True))
    ls = _logit_scale(2).float()
    leaves = [t.detach().requires_grad_() for t in (qkv, tab, bias, ls)]
    cot = torch.randn(2, 35, 16)

    def call(fn, ts):
        with torch.autocast("cpu", dtype=torch.float16):
            return fn(ts[0], (5, 7), 2, 3, 1, ts[1], ts[2], None, ts[3], True)

    with vk.use_backend(backend):
        out = call(vk.window_attention, leaves)
    assert out.dtype == torch.float16
    grads = torch.autograd.grad((out.float() * cot).sum(), leaves)
    assert all(g.dtype == torch.float32 for g in grads)
    e_leaves = [t.detach().requires_grad_() for t in leaves]
    eager = call(oracles.window_attention, e_leaves)
    e_grads = torch.autograd.grad((eager.float() * cot).sum(), e_leaves)
    o_leaves = [t.detach().double().requires_grad_() for t in leaves]
    want = oracles.window_attention(o_leaves[0], (5, 7), 2, 3, 1, o_leaves[1], o_leaves[2], None, o_leaves[3], True)
    o_grads = torch.autograd.grad((want * cot.double()).sum(), o_leaves)
    assert_within("autocast out", out, eager, want, torch.float16)
    for name, g, e, o in zip(["dqkv", "dtable", "dqkv_bias", "dlogit_scale"], grads, e_grads, o_grads):
        assert_within(f"autocast {name}", g, e, o, torch.float16)


# ----------------------------------------------------------------------------- layouts and edge cases


@needs_triton
def test_non_contiguous_inputs():
    b, h, w, c, heads, m, s = 2, 7, 6, 32, 2, 4, 2
    wide = torch.randn(b, h * w, 3 * c + 8, device=DEVICE)
    qkv = wide[..., 5 : 5 + 3 * c]  # row stride 3C + 8
    qkv_t = torch.randn(b, 3 * c, h * w, device=DEVICE).transpose(1, 2)  # last-dim stride != 1 (copied)
    table = torch.randn(heads, (2 * m - 1) ** 2, device=DEVICE).t()  # strides (1, (2M-1)^2)
    bias = torch.randn(2 * 3 * c, device=DEVICE)[::2]  # stride 2 (copied)
    for x in (qkv, qkv_t):
        leaves = [t.detach().clone().requires_grad_() for t in (x, table, bias)]
        with vk.use_backend("triton"):
            out = vk.window_attention(leaves[0], (h, w), heads, m, s, leaves[1], leaves[2])
            out.square().sum().backward()
        ref = [t.detach().contiguous().double().cpu().requires_grad_() for t in (x, table, bias)]
        with vk.use_backend("reference"):
            expect = vk.window_attention(ref[0], (h, w), heads, m, s, ref[1], ref[2])
            expect.square().sum().backward()
        torch.testing.assert_close(out.double().cpu(), expect, atol=1e-4, rtol=1e-4)
        for got, want in zip(leaves, ref):
            torch.testing.assert_close(got.grad.double().cpu(), want.grad, atol=1e-3, rtol=1e-3)


@needs_triton
def test_empty_batch():
    qkv = torch.randn(0, 5 * 7, 3 * 32, device=DEVICE, requires_grad=True)
    table = torch.randn(25, 2, device=DEVICE, requires_grad=True)
    bias = torch.randn(3 * 32, device=DEVICE, requires_grad=True)
    with vk.use_backend("triton"):
        out = vk.window_attention(qkv, (5, 7), 2, 3, 1, table, bias)
        out.sum().backward()
    assert out.shape == (0, 35, 32)
    assert qkv.grad.shape == qkv.shape
    assert (table.grad == 0).all() and (bias.grad == 0).all()


@needs_triton
def test_deterministic_mode_same_grads():
    """No atomics: the backward is bitwise reproducible, and deterministic mode runs the same path."""
    qkv, tab, bias = (None if t is None else t.float().to(DEVICE) for t in _make(2, 9, 10, 32, 2, 4, True, True))
    cot = torch.randn(2, 90, 32, device=DEVICE)

    def run():
        leaves = [t.detach().clone().requires_grad_() for t in (qkv, tab, bias)]
        with vk.use_backend("triton"):
            out = vk.window_attention(leaves[0], (9, 10), 2, 4, 2, leaves[1], leaves[2])
        out.backward(cot)
        return [out.detach()] + [t.grad for t in leaves]

    first = run()
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        det = run()
    finally:
        torch.use_deterministic_algorithms(was)
    for a, b_, c in zip(first, det, run()):
        assert torch.equal(a, b_) and torch.equal(a, c)


@needs_triton
def test_output_fully_written():
    """Every token of out / dqkv is written: NaN-filled memory from the allocator never leaks."""
    qkv = torch.randn(1, 10 * 9, 3 * 32, device=DEVICE, requires_grad=True)
    for _ in range(2):
        filler = torch.full((1 << 16,), float("nan"), device=DEVICE)
        del filler
        with vk.use_backend("triton"):
            out = vk.window_attention(qkv, (10, 9), 2, 4, 2)
            out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(qkv.grad).all()
        qkv.grad = None


@needs_triton
def test_empty_batch_options():
    qkv = torch.randn(0, 5 * 7, 3 * 32, device=DEVICE, requires_grad=True)
    ls = torch.randn(2, 1, 1, device=DEVICE, requires_grad=True)
    with vk.use_backend("triton"):
        out = vk.window_attention(qkv, (5, 7), 2, 3, 1, logit_scale=ls, shift_first=True)
        out.sum().backward()
    assert out.shape == (0, 35, 32) and (ls.grad == 0).all() and ls.grad.shape == ls.shape


def test_triton_unavailable_reasons():
    qkv = torch.randn(1, 9, 3 * 32, dtype=torch.float64)
    with vk.use_backend("triton"), pytest.raises(BackendUnavailableError, match="float64"):
        vk.window_attention(qkv, (3, 3), 1, 3)
    wide = torch.randn(1, 9, 3 * 256)
    if _CAN_RUN:
        with vk.use_backend("triton"), pytest.raises(BackendUnavailableError, match="head dim 256"):
            vk.window_attention(wide, (3, 3), 1, 3)
    if _INTERPRET:
        with vk.use_backend("triton"), pytest.raises(BackendUnavailableError, match="bfloat16"):
            vk.window_attention(qkv.bfloat16(), (3, 3), 1, 3)


def test_auto_picks_triton_on_cuda_only():
    from vitkernels import backends

    qkv = torch.randn(1, 9, 96)
    assert backends.select("window_attention", qkv, [3, 3], 1, 3, 0, None, None, 0.1).backend == "reference"
    if torch.cuda.is_available():
        assert (
            backends.select("window_attention", qkv.cuda(), [3, 3], 1, 3, 0, None, None, 0.1, backward=True).backend
            == "triton"
        )


def test_flops():
    K = pytest.importorskip("vitkernels.triton.window_attention")
    # Swin-T stage 1: 3.78 GFLOP forward (see the kernel header)
    assert K.window_attention_flops(64, 56, 56, 96, 3, 7) == 4 * 64 * 64 * 3 * 49 * 49 * 32


@needs_triton
def test_swin_model_training_step():
    """A small Swin (padding, shift, window = map on the last stage) trained one step on the triton
    backend matches the reference backend: forward, every parameter gradient."""
    model = vk.models.create_model(
        "swin_tiny_patch4_window7_224", embed_dim=16, depths=(2, 2), num_heads=(1, 2), num_classes=4, drop_path_rate=0.0
    ).to(DEVICE)
    x = torch.randn(2, 3, 60, 68, device=DEVICE)
    grads = {}
    for backend in ("reference", "triton"):
        model.zero_grad()
        with vk.use_backend(backend):
            out = model(x)
            out.logsumexp(-1).sum().backward()
        grads[backend] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(grads["triton"][0], grads["reference"][0], atol=1e-4, rtol=1e-4)
    for name, g in grads["reference"][1].items():
        torch.testing.assert_close(grads["triton"][1][name], g, atol=1e-4, rtol=1e-3, msg=name)


# ----------------------------------------------------------------------------- GPU: real Swin shapes

SWIN_SHAPES = [  # B, H, W, C, heads, M, s
    (8, 56, 56, 96, 3, 7, 3),  # Swin-T stage 1
    (8, 28, 28, 192, 6, 7, 3),  # stage 2
    (8, 14, 14, 384, 12, 7, 3),  # stage 3
    (8, 7, 7, 768, 24, 7, 3),  # stage 4 (one window per image)
    (2, 96, 96, 128, 4, 12, 6),  # Swin-B 384 stage 1
    (2, 48, 48, 256, 8, 12, 6),  # stage 2
    (2, 24, 24, 512, 16, 12, 6),  # stage 3
    (2, 12, 12, 1024, 32, 12, 0),  # stage 4
    (2, 50, 38, 96, 3, 7, 3),  # odd map sizes (padding + shift)
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SWIN_SHAPES, ids=lambda c: "B{}_{}x{}_C{}_h{}_M{}_s{}".format(*c))
def test_swin_shapes_gpu(shape, dtype):
    check_case(*shape, dtype=dtype, device="cuda")


@pytest.mark.gpu
def test_many_windows_gpu():
    """B·nW = 66,560 > 65,535 windows on the 1-D grid; checked against the reference backend (the
    looping oracle would be slow at this size)."""
    b, h, w, c, heads, m, s = 1040, 56, 56, 32, 1, 7, 3
    inputs = [
        torch.randn(b, h * w, 3 * c, device="cuda"),
        torch.randn(169, heads, device="cuda"),
        torch.randn(3 * c, device="cuda"),
    ]
    cot = torch.randn(b, h * w, c, device="cuda")

    def fn(x, t, bb):
        return vk.window_attention(x, (h, w), heads, m, s, t, bb)

    with vk.use_backend("reference"):
        want = grads(fn, inputs, cot)
    with vk.use_backend("triton"):
        got = grads(fn, [t.bfloat16() for t in inputs], cot)
    for name, g, r in zip(["out", "dqkv", "dtable", "dqkv_bias"], got, want):
        scale = max(1.0, r.abs().max().item())
        assert (g.float() - r).abs().max().item() <= 3e-2 * scale, name
