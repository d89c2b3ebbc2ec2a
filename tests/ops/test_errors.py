"""Bad input raises a clear error naming the argument and its shape/dtype."""

import pytest
import torch

import vitkernels as vk


def r(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


# Per op: (call, exception, message regex).
CASES_BY_OP = {
    "attention": [
        (lambda: vk.attention(r(2, 3, 4), r(2, 3, 4), r(2, 3, 4)), ValueError, r"q must be 4-D, got shape \(2, 3, 4\)"),
        (
            lambda: vk.attention(r(1, 2, 4, 8), r(1, 2, 5, 8), r(1, 2, 6, 8)),
            ValueError,
            r"k and v must have the same shape",
        ),
        (
            lambda: vk.attention(r(1, 2, 4, 8), r(1, 3, 5, 8), r(1, 3, 5, 8)),
            ValueError,
            r"k must be \(B, heads, Nk, D\)",
        ),
        (
            lambda: vk.attention(r(1, 2, 4, 8), r(1, 2, 5, 8), r(1, 2, 5, 8), r(3, 4, 5)),
            ValueError,
            r"bias must broadcast to \(B, heads, Nq, Nk\) = \(1, 2, 4, 5\), got shape \(3, 4, 5\)",
        ),
        (
            lambda: vk.attention(r(1, 2, 4, 8), r(1, 2, 5, 8, dtype=torch.float16), r(1, 2, 5, 8)),
            TypeError,
            r"k must have the dtype of q",
        ),
        (
            lambda: vk.attention(r(1, 2, 4, 8).int(), r(1, 2, 5, 8), r(1, 2, 5, 8)),
            TypeError,
            r"q must be float32, float16",
        ),
    ],
    "self_attention": [
        (lambda: vk.self_attention(r(2, 5, 20), 2), ValueError, r"last dim 20 is not divisible by 3"),
        (
            lambda: vk.self_attention(r(2, 5, 21), 2),
            ValueError,
            r"C = 7 \(from qkv shape \(2, 5, 21\)\) is not divisible by num_heads = 2",
        ),
        (lambda: vk.self_attention(r(5, 21), 1), ValueError, r"qkv must be 3-D, got shape \(5, 21\)"),
    ],
    "window_attention": [
        (lambda: vk.window_attention(r(1, 12, 24), (3, 5), 2, 2), ValueError, r"qkv has 12 tokens but hw = \(3, 5\)"),
        (lambda: vk.window_attention(r(1, 12, 24), (3, 4), 2, 2, 2), ValueError, r"0 <= shift_size < window_size = 2"),
        (lambda: vk.window_attention(r(1, 12, 24), (3, 4), 2, 0), ValueError, r"window_size must be an int >= 1"),
        (
            lambda: vk.window_attention(r(1, 12, 24), (3, 4), 2, 2, 1, r(4, 2)),
            ValueError,
            r"rel_pos_bias_table must be \(\(2M-1\)\^2, heads\) = \(9, 2\), got shape \(4, 2\)",
        ),
        (
            lambda: vk.window_attention(r(1, 12, 24), (3, 4), 2, 2, 1, None, r(8)),
            ValueError,
            r"qkv_bias must be \(3C,\) = \(24,\)",
        ),
        (
            lambda: vk.window_attention(r(1, 12, 24), (3, 4), 2, 2, 1, logit_scale=r(3)),
            ValueError,
            r"logit_scale must be \(heads,\) or \(heads, 1, 1\) with heads = 2, got shape \(3,\)",
        ),
        (
            lambda: vk.window_attention(r(1, 12, 24), (3, 4), 2, 2, 1, logit_scale=r(2, 1)),
            ValueError,
            r"logit_scale must be \(heads,\) or \(heads, 1, 1\) with heads = 2, got shape \(2, 1\)",
        ),
        (
            lambda: vk.window_attention(r(1, 12, 24), (3, 4), 2, 2, 1, logit_scale=r(2, dtype=torch.float16)),
            TypeError,
            r"logit_scale must have the dtype of qkv \(torch.float32\), got shape \(2,\), dtype torch.float16",
        ),
        (
            lambda: vk.window_attention(r(1, 12, 24), (3, 4), 2, 2, 1, logit_scale=r(2).int()),
            TypeError,
            r"logit_scale must be float32, float16 or bfloat16",
        ),
        (
            lambda: vk.window_attention(r(1, 12, 24), (3, 4), 2, 2, 1, logit_scale=torch.empty(2, device="meta")),
            ValueError,
            r"logit_scale must be on the device of qkv",
        ),
    ],
    "sr_attention": [
        (lambda: vk.sr_attention(r(2, 10, 8), r(2, 4, 8), 2), ValueError, r"kv must be \(B, M, 2C\)"),
        (
            lambda: vk.sr_attention(r(2, 10, 9), r(2, 4, 18), 2),
            ValueError,
            r"C = 9 \(from q shape \(2, 10, 9\)\) is not divisible by num_heads = 2",
        ),
    ],
    "xca": [
        (
            lambda: vk.xca(r(2, 10, 24), 2, r(3, 1, 1)),
            ValueError,
            r"temperature must be \(heads, 1, 1\) or \(heads,\) with heads = 2",
        ),
    ],
    "space_time_attention": [
        (
            lambda: vk.space_time_attention(r(1, 10, 24), 3, 2, "time"),
            ValueError,
            r"frames must be a positive int dividing",
        ),
        (lambda: vk.space_time_attention(r(1, 9, 24), 3, 2, "depth"), ValueError, r"axis must be 'time' or 'space'"),
        (
            lambda: vk.space_time_attention(r(1, 9, 24), 3, 2, "time", r(1, 24)),
            ValueError,
            r"cls_qkv is only valid with axis 'space'",
        ),
        (
            lambda: vk.space_time_attention(r(1, 9, 24), 3, 2, "space", r(1, 12)),
            ValueError,
            r"cls_qkv must be \(B, 3C\)",
        ),
        (
            lambda: vk.space_time_attention(r(1, 9, 24), 3, 2, "space", None, "tt"),
            ValueError,
            r"layout must be 'st' or 'ts'",
        ),
    ],
    "dwconv": [
        (
            lambda: vk.dwconv(r(1, 12, 4), (3, 4), r(4, 1, 2, 2)),
            ValueError,
            r"weight must be \(C, 1, k, k\) with C = 4 and k odd",
        ),
        (lambda: vk.dwconv(r(1, 12, 4), (3, 4), r(4, 1, 3, 3), None, "silu"), ValueError, r"activation must be one of"),
        (lambda: vk.dwconv(r(1, 12, 4), (3, 4), r(4, 1, 3, 3), r(5)), ValueError, r"bias must be \(C,\) = \(4,\)"),
    ],
    "mix_ffn": [
        (
            lambda: vk.mix_ffn(r(1, 12, 4), (3, 4), r(8, 5), None, r(8, 1, 3, 3), None, r(4, 8), None),
            ValueError,
            r"fc1_weight must be \(hidden, C\) with C = 4",
        ),
    ],
    "pool_attention": [
        (
            lambda: vk.pool_attention(r(2, 13, 8), r(2, 2, 5, 8), r(2, 2, 5, 8), (3, 4), (2, 2)),
            ValueError,
            r"q must be 4-D, got shape \(2, 13, 8\)",
        ),
        (
            lambda: vk.pool_attention(r(2, 2, 13, 8), r(2, 2, 5, 8), r(2, 2, 5, 4), (3, 4), (2, 2)),
            ValueError,
            r"k and v must have the same shape, got k \(2, 2, 5, 8\) and v \(2, 2, 5, 4\)",
        ),
        (
            lambda: vk.pool_attention(r(2, 2, 13, 8), r(2, 3, 5, 8), r(2, 3, 5, 8), (3, 4), (2, 2)),
            ValueError,
            r"k must be \(B, heads, Nk, D\) = \(2, 2, Nk, 8\) to match q \(2, 2, 13, 8\), got k shape \(2, 3, 5, 8\)",
        ),
        (
            lambda: vk.pool_attention(r(2, 2, 12, 8), r(2, 2, 5, 8), r(2, 2, 5, 8), (3, 4), (2, 2)),
            ValueError,
            r"q has Nq = 12 tokens but q_hw = \(3, 4\) needs 3\*4 \+ 1 \(class token\) = 13",
        ),
        (
            lambda: vk.pool_attention(
                r(2, 2, 12, 8), r(2, 2, 5, 8), r(2, 2, 5, 8), (3, 4), (2, 2), has_cls_token=False
            ),
            ValueError,
            r"k has Nk = 5 tokens but k_hw = \(2, 2\) needs 2\*2 = 4",
        ),
        (
            lambda: vk.pool_attention(r(1, 1, 13, 8), r(1, 1, 5, 8), r(1, 1, 5, 8), (3, 4), (2, 0)),
            ValueError,
            r"k_hw must be \(H, W\) with ints H, W >= 1, got \(2, 0\)",
        ),
        (
            lambda: vk.pool_attention(r(1, 1, 13, 8), r(1, 1, 5, 8), r(1, 1, 5, 8), (3, 4), (2, 2), r(5, 8)),
            ValueError,
            r"rel_pos_h and rel_pos_w must be given together \(or both None\), got only rel_pos_h",
        ),
        (
            lambda: vk.pool_attention(r(1, 1, 13, 8), r(1, 1, 5, 8), r(1, 1, 5, 8), (3, 4), (2, 2), r(5, 8), r(7, 4)),
            ValueError,
            r"rel_pos_w must be \(L, D\) with D = 8 \(the head dim of q\), got shape \(7, 4\)",
        ),
        (
            lambda: vk.pool_attention(r(1, 1, 13, 8), r(1, 1, 5, 8), r(1, 1, 5, 8), (3, 4), (2, 2), r(3, 8), r(7, 8)),
            ValueError,
            r"rel_pos_h table too short: q_hw \(3, 4\) against k_hw \(2, 2\) needs L >= 4 rows .*got shape \(3, 8\)",
        ),
        (
            lambda: vk.pool_attention(r(1, 1, 13, 8), r(1, 1, 5, 8), r(1, 1, 5, 8), (3, 4), (2, 2), r(5, 8), r(5, 8)),
            ValueError,
            r"rel_pos_w table too short: .* needs L >= 6 rows",
        ),
        (
            lambda: vk.pool_attention(
                r(1, 1, 13, 8), r(1, 1, 5, 8), r(1, 1, 5, 8), (3, 4), (2, 2), r(5, 8, dtype=torch.float16), r(7, 8)
            ),
            TypeError,
            r"rel_pos_h must have the dtype of q \(torch.float32\), got shape \(5, 8\), dtype torch.float16",
        ),
        (
            lambda: vk.pool_attention(
                r(1, 1, 13, 8), r(1, 1, 5, 8, dtype=torch.float16), r(1, 1, 5, 8), (3, 4), (2, 2)
            ),
            TypeError,
            r"k must have the dtype of q",
        ),
        (
            lambda: vk.pool_attention(
                r(1, 1, 13, 8), r(1, 1, 5, 8), r(1, 1, 5, 8), (3, 4), (2, 2), r(5, 8), torch.empty(7, 8, device="meta")
            ),
            ValueError,
            r"rel_pos_w must be on the device of q",
        ),
        (
            lambda: vk.pool_attention(r(1, 1, 13, 8), r(1, 1, 5, 8), r(1, 1, 5, 8), (3, 4), (2, 2), residual=1),
            TypeError,
            r"residual must be a bool, got 1",
        ),
        (
            lambda: vk.pool_attention(r(1, 0, 13, 8), r(1, 0, 5, 8), r(1, 0, 5, 8), (3, 4), (2, 2)),
            ValueError,
            r"heads >= 1 and D >= 1, got shape \(1, 0, 13, 8\)",
        ),
    ],
}
CASES = [(op, *case) for op, cases in CASES_BY_OP.items() for case in cases]


@pytest.mark.parametrize("i", range(len(CASES)))
def test_bad_input_message(i):
    _, call, exc, pattern = CASES[i]
    with pytest.raises(exc, match=pattern):
        call()


def test_every_op_has_bad_input_cases():
    """A new op adds its bad-input cases to CASES_BY_OP (CONTRIBUTING.md, "Adding an op")."""
    from vitkernels.ops import _spec

    assert list(CASES_BY_OP) == _spec.names()


def test_errors_name_the_op():
    with pytest.raises(ValueError, match=r"^vitkernels\.self_attention:"):
        vk.self_attention(r(2, 5, 20), 2)


def test_device_mismatch_message():
    q = r(1, 2, 4, 8)
    k = torch.empty(1, 2, 4, 8, device="meta")
    with pytest.raises(ValueError, match="k must be on the device of q"):
        vk.attention(q, k, k)


@pytest.mark.parametrize(
    "call",
    [
        lambda: vk.self_attention(r(1, 4, 12), True),
        lambda: vk.self_attention(r(1, 4, 12), 2.0),
        lambda: vk.sr_attention(r(1, 4, 4), r(1, 2, 8), True),
        lambda: vk.xca(r(1, 4, 12), 1.0, r(1)),
        lambda: vk.space_time_attention(r(1, 6, 12), True, 1, "time"),
    ],
)
def test_int_arguments_reject_bools_and_floats(call):
    with pytest.raises(TypeError, match="must be an int"):
        call()


def test_window_attention_shift_first_must_be_bool():
    with pytest.raises((TypeError, RuntimeError), match="shift_first"):
        vk.window_attention(r(1, 12, 24), (3, 4), 2, 2, 1, shift_first=1)


def test_mix_ffn_names_its_own_arguments():
    with pytest.raises(
        ValueError, match=r"vitkernels\.mix_ffn: dw_weight must be \(hidden, 1, k, k\) with hidden = 32"
    ):
        vk.mix_ffn(r(1, 30, 8), (5, 6), r(32, 8), None, r(16, 1, 3, 3), None, r(8, 32), None)
    with pytest.raises(ValueError, match=r"vitkernels\.mix_ffn: dw_bias must be \(32,\)"):
        vk.mix_ffn(r(1, 30, 8), (5, 6), r(32, 8), None, r(32, 1, 3, 3), r(16), r(8, 32), None)


# ----------------------------------------------------------------------------- inline validation

# Ops whose `validate` accepts valid arguments in a few inline comparisons and leaves everything else to
# `_validate` (host time per call): public arguments -> validate's arguments.
_VALIDATE_ARGS = {
    "attention": lambda a: a[:4],
    "space_time_attention": lambda a: a[:6],
    "dwconv": lambda a: (a[0], list(a[1]), *a[2:5]),
    "mix_ffn": lambda a: (a[0], list(a[1]), *a[2:8]),
    "pool_attention": lambda a: a[:9],
}


def _mutate(rng, value):
    """A random neighbour of one argument: another dtype, device, rank or size, type, or value."""
    if isinstance(value, torch.Tensor):
        shape = list(value.shape)
        kind = rng.randrange(6)
        if kind == 0:
            return value.to(rng.choice([torch.float16, torch.float64, torch.int32, torch.bool]))
        if kind == 1:
            return torch.empty(value.shape, dtype=value.dtype, device="meta")
        if kind == 2 and shape:
            return value.sum(rng.randrange(len(shape)))
        if kind == 3:
            return value.unsqueeze(rng.randrange(len(shape) + 1))
        if kind == 4 and shape:
            shape[rng.randrange(len(shape))] = rng.choice([0, 1, 2, 3, 5, 7])
            return torch.zeros(shape, dtype=value.dtype)
        return value.flatten()[1:].view(-1)[: max(0, value.numel() - 1)] if value.numel() > 1 else "tensor?"
    if isinstance(value, bool):
        return rng.choice([not value, 1, None])
    if isinstance(value, int):
        return rng.choice([0, -1, value + 1, True, float(value)])
    if isinstance(value, (list, tuple)):
        return rng.choice([tuple(value), list(value)[:1], [*value, 1], [value[0], 0], [float(v) for v in value]])
    if isinstance(value, str):
        return rng.choice(["st", "ts", "time", "space", "gelu", "relu", "other"])
    return rng.choice([None, torch.zeros(3)])


@pytest.mark.parametrize("op", list(_VALIDATE_ARGS))
def test_inline_validation_accepts_what_the_checks_accept(op):
    """`validate` = `_validate` (same head dim, same error) on the samples and ~300 random
    neighbours of them: the inline comparisons accept nothing the checks reject."""
    import random
    import sys

    from vitkernels._samples import samples, variant_samples

    module = sys.modules[f"vitkernels.ops.{op}"]
    bases = [samples(batch=1)[op], *variant_samples(batch=1).get(op, {}).values()]
    rng = random.Random(op)

    def outcome(fn, args):
        try:
            return "ok", fn(*args)
        except Exception as e:  # whatever _validate raises, validate must raise too
            return type(e).__name__, str(e)

    accepted = 0
    for i in range(300):
        args = list(_VALIDATE_ARGS[op](bases[i % len(bases)]))
        for _ in range(rng.choice([0, 1, 1, 2])):
            j = rng.randrange(len(args))
            args[j] = _mutate(rng, args[j])
        want = outcome(module._validate, args)
        assert outcome(module.validate, args) == want, (op, args)
        accepted += want[0] == "ok"
    assert 20 < accepted < 290  # both sides of the checks were exercised
