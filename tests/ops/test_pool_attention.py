"""pool_attention (MViTv2 pooling attention) through the op on every backend that runs here.

CPU: the Triton kernels in the interpreter (float32, float16) and the reference (float32); GPU (marked
gpu): Triton and CUDA (forward; its backward runs on auto) in float16/bfloat16/float32 and MViTv2's
real stage shapes. Oracle: tests/oracles.pool_attention in float64 on CPU (autograd for the grads).
Eager: timm's code path (scores, cal_rel_pos_type's gather + in-place add, softmax, ·v, + q) in the
tested dtype. Rule: helpers.assert_within for out and the grads of q, k, v, rel_pos_h, rel_pos_w.
Also: the lse every forward returns (natural log, so any backward can follow any forward), non-
contiguous q / k / v as timm produces them, autocast dtypes, the bench compositions and catalogue.
"""

import math

import pytest
import torch

import vitkernels as vk

import oracles
from helpers import FLOOR, assert_within, backends_here, grads, max_err

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

BACKENDS = backends_here() + [("reference", torch.float32, "cpu")]
FUSED = backends_here()


def eager(q, k, v, q_hw, k_hw, th=None, tw=None, cls=True, residual=True, scale=None):
    """timm MultiScaleAttention.forward after its pools and norms, in the inputs' dtype."""
    b, h, nq, d = q.shape
    sp = 1 if cls else 0
    (qh, qw), (kh, kw) = q_hw, k_hw
    attn = (q * (d**-0.5 if scale is None else scale)) @ k.transpose(-2, -1)
    if th is not None:
        r_q = q[:, :, sp:].reshape(b, h, qh, qw, d)
        ih, iw = (oracles.pool_rel_pos_index(a, c).to(q.device) for a, c in ((qh, kh), (qw, kw)))
        rel_h = torch.einsum("byhwc,hkc->byhwk", r_q, th[ih])
        rel_w = torch.einsum("byhwc,wkc->byhwk", r_q, tw[iw])
        attn[:, :, sp:, sp:] = (
            attn[:, :, sp:, sp:].view(b, h, qh, qw, kh, kw) + rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)
        ).view(b, h, qh * qw, kh * kw)
    x = attn.softmax(dim=-1) @ v
    if residual:
        x = x + q
    return x.transpose(1, 2).reshape(b, nq, h * d)


def make(b, heads, q_hw, k_hw, d, cls=True, tables=True):
    sp = 1 if cls else 0
    q = torch.randn(b, heads, q_hw[0] * q_hw[1] + sp, d, dtype=torch.float64)
    k, v = (torch.randn(b, heads, k_hw[0] * k_hw[1] + sp, d, dtype=torch.float64) for _ in range(2))
    if not tables:
        return [q, k, v]
    # timm's lengths; scaled so that q·table is O(1), like the scaled scores
    th = torch.randn(2 * max(q_hw[0], k_hw[0]) - 1, d, dtype=torch.float64) / math.sqrt(d)
    tw = torch.randn(2 * max(q_hw[1], k_hw[1]) - 1, d, dtype=torch.float64) / math.sqrt(d)
    return [q, k, v, th, tw]


def check(backend, dtype, device, inputs, q_hw, k_hw, cls=True, residual=True, scale=None, low=None, label="", skip=()):
    """Out and every grad of `backend` vs the float64 oracle, bounded by the eager error (2x rule); returns
    (fused, oracle). `low`: the inputs in the tested dtype and device when the test builds them itself
    (strided views); `skip`: names the caller checks itself."""
    opts = dict(cls=cls, residual=residual, scale=scale)

    def fused_fn(q, k, v, th=None, tw=None):
        return vk.pool_attention(q, k, v, q_hw, k_hw, th, tw, cls, residual, scale)

    def oracle_fn(q, k, v, th=None, tw=None):
        return oracles.pool_attention(q, k, v, q_hw, k_hw, th, tw, cls, residual, scale)

    def eager_fn(q, k, v, th=None, tw=None):
        return eager(q, k, v, q_hw, k_hw, th, tw, **opts)

    b, heads, nq, d = inputs[0].shape
    cot = torch.randn(b, nq, heads * d, dtype=torch.float64)
    oracle = grads(oracle_fn, inputs, cot)
    low = low if low is not None else [t.to(device=device, dtype=dtype) for t in inputs]
    with vk.use_backend(backend):
        fused = grads(fused_fn, low, cot.to(device))
    ref_low = grads(eager_fn, low, cot.to(device))
    names = ["out", "dq", "dk", "dv", "drel_pos_h", "drel_pos_w"]
    for name, f, e, o in zip(names, fused, ref_low, oracle):
        assert f.dtype == dtype, f"{name}: dtype {f.dtype}"
        if name in skip:
            continue
        assert_within(f"{backend} {dtype} {name} {label}", f, e, o, dtype)
    return fused, oracle


# B, heads, q_hw, k_hw, D: MViTv2's stage patterns in miniature
SHAPES = [
    (2, 1, (4, 4), (1, 1), 32),  # kv pooled by 4 (stage 1)
    (1, 2, (4, 4), (2, 2), 16),  # kv pooled by 2 (stage 2)
    (1, 2, (3, 5), (2, 3), 24),  # non-square, non-integer ratios
    (2, 1, (2, 2), (4, 4), 32),  # k bigger than q (a stage's first block: q pooled by 2 first)
    (1, 1, (4, 3), (2, 3), 64),
]


@pytest.mark.parametrize("backend,dtype,device", BACKENDS)
@pytest.mark.parametrize(
    "shape", SHAPES, ids=lambda s: "B{}_h{}_q{}x{}_k{}x{}_D{}".format(s[0], s[1], *s[2], *s[3], s[4])
)
@pytest.mark.parametrize("cls", [True, False], ids=["cls", "nocls"])
def test_vs_oracle(backend, dtype, device, shape, cls):
    b, heads, q_hw, k_hw, d = shape
    if k_hw == (1, 1) and not cls:
        pytest.skip("a single key: test_single_key")
    check(backend, dtype, device, make(b, heads, q_hw, k_hw, d, cls), q_hw, k_hw, cls=cls)


@pytest.mark.parametrize("backend,dtype,device", BACKENDS)
def test_single_key(backend, dtype, device):
    """kv pooled to one token and no class token: softmax ≡ 1, so out = v + q and the grads of k and of
    both tables are exactly 0 by cancellation (dS = P∘(dP − delta) = 0), which eager reproduces exactly.
    A fused backward's delta = rowsum(dO∘(out − q)) carries the rounding of the stored out, so those
    grads get an absolute bound: two floors per summed row (B·Nq = 2·16 of them)."""
    inputs = make(2, 1, (4, 4), (1, 1), 32, cls=False)
    skip = ("dk", "drel_pos_h", "drel_pos_w")
    fused, oracle = check(backend, dtype, device, inputs, (4, 4), (1, 1), cls=False, skip=skip, label="1 key")
    for name, i in zip(skip, (2, 4, 5)):  # positions in [out, dq, dk, dv, drel_pos_h, drel_pos_w]
        assert not oracle[i].any(), name
        err = max_err(fused[i], oracle[i])
        assert err <= 2 * FLOOR[dtype] * 2 * 16, f"{backend} {dtype} {name}: {err:.3e}"


@pytest.mark.parametrize("backend,dtype,device", BACKENDS)
@pytest.mark.parametrize(
    "cls,residual,tables,scale",
    [(True, False, True, None), (False, True, False, None), (True, False, False, 0.3), (False, False, True, 0.7)],
    ids=["nores", "notables", "nores_notables_scale", "nocls_nores_scale"],
)
def test_options(backend, dtype, device, cls, residual, tables, scale):
    q_hw, k_hw = (3, 4), (2, 3)
    inputs = make(1, 2, q_hw, k_hw, 16, cls, tables)
    check(backend, dtype, device, inputs, q_hw, k_hw, cls=cls, residual=residual, scale=scale)


@pytest.mark.parametrize("backend,dtype,device", BACKENDS)
def test_mvitv2_head_dim(backend, dtype, device):
    """MViTv2's D = 96 (every stage), stage 1's pattern (kv pooled by 4)."""
    check(backend, dtype, device, make(1, 1, (8, 8), (2, 2), 96, cls=False), (8, 8), (2, 2), cls=False)


@pytest.mark.parametrize("backend,dtype,device", BACKENDS)
def test_non_contiguous_packed_qkv(backend, dtype, device):
    """q / k / v as slices of timm's packed qkv permute (B, N, 3, heads, D) -> (3, B, heads, N, D), the
    layout an unpooled MultiScaleAttention hands on; tables as column slices."""
    B, heads, D, hw = 2, 2, 16, (3, 4)
    N = hw[0] * hw[1] + 1
    packed = torch.randn(B, N, 3, heads, D, dtype=torch.float64)
    th64 = torch.randn(5, 2 * D, dtype=torch.float64) * 0.3
    tw64 = torch.randn(7, D + 4, dtype=torch.float64) * 0.3
    views64 = [*packed.permute(2, 0, 3, 1, 4).unbind(0), th64[:, ::2], tw64[:, 2 : D + 2]]
    p, th, tw = (t.to(device=device, dtype=dtype) for t in (packed, th64, tw64))
    low = [*p.permute(2, 0, 3, 1, 4).unbind(0), th[:, ::2], tw[:, 2 : D + 2]]
    assert not low[0].is_contiguous() and not low[3].is_contiguous()
    check(backend, dtype, device, [t.contiguous() for t in views64], hw, hw, low=low, label="packed qkv")


@pytest.mark.parametrize("backend,dtype,device", BACKENDS)
def test_non_contiguous_pooled_views(backend, dtype, device):
    """q / k / v as timm's reshape_post_pool leaves them without a norm (avg / max pooling): (B, heads,
    D, L) transposed, so the last dim is strided."""
    B, heads, D, q_hw, k_hw = 1, 2, 16, (4, 3), (2, 3)
    base64 = [torch.randn(B, heads, D, h * w, dtype=torch.float64) for h, w in (q_hw, k_hw, k_hw)]
    inputs = [t.transpose(2, 3).contiguous() for t in base64]
    tables = make(1, 1, q_hw, k_hw, D)[3:]
    low_base = [t.to(device=device, dtype=dtype) for t in base64]
    low = [t.transpose(2, 3) for t in low_base] + [t.to(device=device, dtype=dtype) for t in tables]
    assert low[0].stride(-1) != 1
    check(backend, dtype, device, inputs + tables, q_hw, k_hw, cls=False, low=low, label="pooled views")


@pytest.mark.parametrize("backend,dtype,device", BACKENDS)
@pytest.mark.parametrize("cls", [True, False], ids=["cls", "nocls"])
def test_lse_is_the_natural_log_logsumexp(backend, dtype, device, cls):
    """Every forward returns the float32 natural-log logsumexp of scale·q·k + R per row: the backward of
    any backend can consume it."""
    q_hw, k_hw = (3, 4), (2, 2)
    q, k, v, th, tw = make(2, 2, q_hw, k_hw, 16, cls)
    scale = 16**-0.5
    args = [t.to(device=device, dtype=dtype) for t in (q, k, v)]
    tabs = [t.to(device=device, dtype=dtype) for t in (th, tw)]
    with vk.use_backend(backend):
        out, lse = torch.ops.vitkernels._pool_attention_fwd(*args, list(q_hw), list(k_hw), *tabs, cls, True, scale)
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3] and out.shape == (2, q.shape[2], 32)
    # the scores, from the oracle's own pieces: out-of-softmax logits = log(p) + lse for any lse
    b, h, nq, d = q.shape
    sp = int(cls)
    s = (q @ k.transpose(-1, -2)) * scale
    r = torch.zeros_like(s)
    ih, iw = oracles.pool_rel_pos_index(q_hw[0], k_hw[0]), oracles.pool_rel_pos_index(q_hw[1], k_hw[1])
    for i in range(nq - sp):
        for j in range(k.shape[2] - sp):
            a, c = divmod(i, q_hw[1])
            e, f = divmod(j, k_hw[1])
            r[:, :, i + sp, j + sp] = q[:, :, i + sp] @ (th[ih[a, e]] + tw[iw[c, f]])
    want = torch.logsumexp(s + r, dim=-1)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(lse.double().cpu(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("backend,dtype,device", FUSED)
def test_backward_after_the_reference_forward(backend, dtype, device):
    """The fused backward on the reference forward's (out, lse): the same grads as the reference's."""
    q_hw, k_hw = (4, 3), (2, 3)
    q, k, v, th, tw = (t.to(device=device, dtype=dtype) for t in make(1, 2, q_hw, k_hw, 16))
    cfg = (list(q_hw), list(k_hw), th, tw, True, True, 0.25)
    with vk.use_backend("reference"):
        out, lse = torch.ops.vitkernels._pool_attention_fwd(q, k, v, *cfg)
    dout = torch.randn_like(out)
    with vk.use_backend(backend):
        got = torch.ops.vitkernels._pool_attention_bwd(dout, q, k, v, out, lse, *cfg)
    with vk.use_backend("reference"):
        want = torch.ops.vitkernels._pool_attention_bwd(dout, q, k, v, out, lse, *cfg)
    tol = 2e-4 if dtype == torch.float32 else 2e-2
    for name, g, w in zip(("dq", "dk", "dv", "drel_h", "drel_w"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        torch.testing.assert_close(g.float(), w.float(), atol=tol, rtol=tol, msg=lambda m, n=name: f"{n}: {m}")


def test_private_backward_without_tables_returns_none():
    q, k, v = make(1, 1, (2, 2), (1, 1), 8, tables=False)
    with vk.use_backend("reference"):
        out, lse = torch.ops.vitkernels._pool_attention_fwd(q, k, v, [2, 2], [1, 1], None, None, True, True, 0.3)
        grads_ = torch.ops.vitkernels._pool_attention_bwd(
            torch.ones_like(out), q, k, v, out, lse, [2, 2], [1, 1], None, None, True, True, 0.3
        )
    assert grads_[3] is None and grads_[4] is None
    # the residual term is in dq: with v = 0 and dout = 1, dq = 1 plus the softmax part (0 as v = 0)
    with vk.use_backend("reference"):
        dq = torch.ops.vitkernels._pool_attention_bwd(
            torch.ones_like(out), q, k, torch.zeros_like(v), out, lse, [2, 2], [1, 1], None, None, True, True, 0.3
        )[0]
    torch.testing.assert_close(dq, torch.ones_like(dq))


def test_autocast_cpu_bfloat16_dtypes():
    """Under autocast(cpu, bfloat16) float32 q / k / v / tables run in bfloat16: a bfloat16 output, and
    each gradient in its input's own dtype (float32 tables get float32 grads). Outside autocast a
    float32 table with bfloat16 q is an error."""
    q, k, v, th, tw = (t.float().requires_grad_() for t in make(2, 2, (3, 4), (2, 2), 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vk.pool_attention(q, k, v, (3, 4), (2, 2), th, tw)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    for t in (q, k, v, th, tw):
        assert t.grad is not None and t.grad.dtype == torch.float32
    want = oracles.pool_attention(*(t.detach().double() for t in (q, k, v)), (3, 4), (2, 2), th.double(), tw.double())
    torch.testing.assert_close(out.double(), want.detach(), atol=8e-2, rtol=5e-2)
    with pytest.raises(TypeError, match="rel_pos_h must have the dtype of q"):
        vk.pool_attention(q.detach().bfloat16(), k.detach().bfloat16(), v.detach().bfloat16(), (3, 4), (2, 2), th, tw)


def test_reasons_name_the_limits(monkeypatch):
    monkeypatch.delenv("VITKERNELS_CUDA_EMULATOR", raising=False)  # "cuda" on CPU tensors: not runnable
    from vitkernels.triton import pool_attention as tk

    caps = vk.ops._spec.get("pool_attention").kernels()["triton"].caps
    assert caps.head_dims == range(1, tk.MAX_HEAD_DIM + 1)  # declared as data: the launcher's own limit
    q = torch.randn(1, 1, 5, 136)
    reasons = vk.not_supported_reasons("pool_attention", "triton", q, q, q, [2, 2], [2, 2])
    assert any("head dim 136 > 128" in r for r in reasons), reasons
    q = torch.randn(1, 1, 5, 8)
    q64 = q.double()
    assert any(
        "float64" in r for r in vk.not_supported_reasons("pool_attention", "triton", q64, q64, q64, [2, 2], [2, 2])
    )
    assert vk.not_supported_reasons("pool_attention", "reference", q64, q64, q64, [2, 2], [2, 2]) == []
    if torch.cuda.is_available():
        return
    with vk.use_backend("cuda"), pytest.raises(vk.BackendUnavailableError, match="cuda backend needs CUDA tensors"):
        vk.pool_attention(torch.randn(1, 1, 5, 16), torch.randn(1, 1, 5, 16), torch.randn(1, 1, 5, 16), (2, 2), (2, 2))


# ------------------------------------------------------------------------------ bench: baselines, catalogue


def test_bench_compositions_compute_the_op():
    """The eager (timm), SDPA and FlexAttention compositions of `vitkernels-bench ops` give the op's
    output and grads (float64; FlexAttention runs eagerly on CPU, forward only there)."""
    from vitkernels.bench import baselines, cases

    for case in (
        cases.pool_attention_case("t", "test", 2, 2, (4, 3), (2, 3), 8, cls=True),
        cases.pool_attention_case("t", "test", 1, 2, (2, 2), (4, 4), 8, cls=False, residual=False),
        cases.pool_attention_case("t", "test", 1, 1, (3, 3), (1, 1), 8, cls=True, tables=False),
    ):
        g = torch.Generator().manual_seed(0)
        t = cases.make_inputs(case, torch.float64, "cpu", g, requires_grad=True)
        want = vk.pool_attention(**t, **case.args)
        cot = torch.randn(want.shape, generator=g, dtype=torch.float64)
        leaves = list(t.values())
        want_grads = torch.autograd.grad(want, leaves, cot)
        for core in ("eager", "sdpa", "flex"):
            if core == "flex":
                pytest.importorskip("torch.nn.attention.flex_attention")
                with torch.no_grad():  # FlexAttention has no CPU backward
                    got = baselines.composition(case, core, torch.float64, "cpu")({n: x.detach() for n, x in t.items()})
                torch.testing.assert_close(got, want.detach(), atol=1e-10, rtol=1e-10, msg=lambda m: f"flex: {m}")
                continue
            got = baselines.composition(case, core, torch.float64, "cpu")(t)
            torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10, msg=lambda m, c=core: f"{c}: {m}")
            for a, b in zip(torch.autograd.grad(got, leaves, cot), want_grads):
                torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=lambda m, c=core: f"{c} grad: {m}")


def test_bench_catalogue_is_timms_mvitv2_geometry():
    """The catalogue's mvitv2_tiny shapes are exactly the (heads, q map, kv map, D) timm's mvitv2_tiny
    runs at 224 px, every distinct block shape once; costs follow the documented formula."""
    timm = pytest.importorskip("timm")
    mvitv2 = pytest.importorskip("timm.models.mvitv2")
    from vitkernels.bench import cases

    seen = set()
    orig = mvitv2.cal_rel_pos_type

    def spy(attn, q, has_cls_token, q_size, k_size, rel_pos_h, rel_pos_w):
        seen.add((q.shape[1], tuple(q_size), tuple(k_size), q.shape[-1], has_cls_token, rel_pos_h.shape[0]))
        return orig(attn, q, has_cls_token, q_size, k_size, rel_pos_h, rel_pos_w)

    model = timm.create_model("mvitv2_tiny", pretrained=False, device="meta").eval()  # shapes only
    try:
        mvitv2.cal_rel_pos_type = spy
        with torch.no_grad():
            model(torch.empty(1, 3, 224, 224, device="meta"))
    finally:
        mvitv2.cal_rel_pos_type = orig
    ours = [c for c in cases.all_cases() if c.op == "pool_attention" and c.model == "mvitv2_tiny"]
    got = {
        (
            c.shape["heads"],
            c.args["q_hw"],
            c.args["k_hw"],
            c.shape["D"],
            c.args["has_cls_token"],
            c.tensors["rel_pos_h"].shape[0],
        )
        for c in ours
    }
    assert got == seen and len(ours) == len(seen)
    s1 = next(c for c in ours if c.label == "mvitv2_t s1@224")
    assert s1.representative and s1.batch == 64 and s1.shape["Nq"] == 3136 and s1.shape["Nk"] == 196
    assert s1.flops == pytest.approx(4 * 64 * 3136 * 196 * 96 + 2 * 64 * 3136 * 28 * 96)
    assert any(c.tiny for c in ours)
    cls_cases = [c for c in cases.all_cases() if c.op == "pool_attention" and c.model == "mvitv2_base_cls"]
    assert cls_cases and all(c.args["has_cls_token"] and c.shape["Nq"] == c.args["q_hw"][0] ** 2 + 1 for c in cls_cases)


# ------------------------------------------------------------------------------ GPU, real shapes

REAL = [  # heads, q map, kv map, cls: MViTv2 at 224 (D = 96)
    (1, 56, 14, False),  # stage 1
    (2, 28, 28, True),  # stage 2, first block
    (4, 14, 28, False),  # stage 3, first block (k bigger)
    (8, 7, 7, True),  # stage 4
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", REAL, ids=lambda s: "h{}_q{}_k{}_{}".format(*s[:3], "cls" if s[3] else "nocls"))
def test_real_shapes_gpu(backend, dtype, shape):
    """Out and grads at MViTv2's shapes (B = 2) vs the reference in float64 on the GPU (itself checked
    against the oracle in test_reference_vs_oracle.py), 2x rule against timm's eager path in dtype."""
    heads, qs, ks, cls = shape
    q_hw, k_hw = (qs, qs), (ks, ks)
    inputs = [t.cuda() for t in make(2, heads, q_hw, k_hw, 96, cls)]
    cot = torch.randn(2, inputs[0].shape[2], heads * 96, dtype=torch.float64, device="cuda")

    def fused_fn(*a):
        return vk.pool_attention(*a[:3], q_hw, k_hw, *a[3:], cls)

    with vk.use_backend("reference"):
        oracle = grads(fused_fn, inputs, cot)
    low = [t.to(dtype) for t in inputs]
    with vk.use_backend(backend):
        fused = grads(fused_fn, low, cot)
    ref_low = grads(lambda *a: eager(*a[:3], q_hw, k_hw, *a[3:], cls=cls), low, cot)
    for name, f, e, o in zip(["out", "dq", "dk", "dv", "drel_pos_h", "drel_pos_w"], fused, ref_low, oracle):
        assert_within(f"{backend} {dtype} {name} {shape}", f, e, o, dtype)


def test_eager_helper_matches_the_oracle():
    """The test's eager composition (timm's code path) is itself right: float64 against the oracle."""
    inputs = make(2, 2, (3, 5), (2, 3), 8, cls=True)
    a = eager(*inputs[:3], (3, 5), (2, 3), *inputs[3:], cls=True, residual=True)
    b = oracles.pool_attention(*inputs[:3], (3, 5), (2, 3), *inputs[3:], True, True)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
