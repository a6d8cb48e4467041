"""Fused LayerNorm and rotary embedding: C++ fast paths vs their scalar references vs numpy float64, and the
MindSpore ops' values and gradients vs the plain MindSpore compositions (PyNative and ms.jit) and vs torch."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from conftest import assert_rel_close
from hypothesis import given, settings
from hypothesis import strategies as st
from mindspore import Tensor

from omni_fast.ops.layer_norm import LayerNormOp, layer_norm
from omni_fast.ops.layer_norm import explain as explain_layer_norm
from omni_fast.ops.library import host_module
from omni_fast.ops.reference import apply_rotary_reference, layer_norm_reference
from omni_fast.ops.rotary import Rotary, apply_rotary
from omni_fast.ops.rotary import explain as explain_rotary

EPS = 1e-5  # torch nn.LayerNorm's default, used by the audio encoder


# ---------------------------------------------------------------- numpy float64 oracles


def numpy_layer_norm(x, w, b, eps):
    x = x.astype(np.float64)
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps) * w + b


def numpy_layer_norm_grads(dy, x, w, eps):
    x, dy, w = x.astype(np.float64), dy.astype(np.float64), w.astype(np.float64)
    n = x.shape[-1]
    mean = x.mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)
    xhat = (x - mean) * rstd
    g = w * dy
    dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    return dx, (dy * xhat).reshape(-1, n).sum(0), dy.reshape(-1, n).sum(0)


def rotate_half(v):
    h = v.shape[-1] // 2
    return np.concatenate([-v[..., h:], v[..., :h]], -1)


def rotate_half_transposed(v):
    h = v.shape[-1] // 2
    return np.concatenate([v[..., h:], -v[..., :h]], -1)


def _broadcastable(t, x):
    """cos/sin of shape [..., D] -> [..., 1, D] so that numpy broadcasts them over x's heads."""
    return t if t.ndim == x.ndim else t[..., None, :]


def numpy_rotary(x, cos, sin):
    x = x.astype(np.float64)
    cos, sin = _broadcastable(cos, x), _broadcastable(sin, x)
    return x * cos + rotate_half(x) * sin


def numpy_rotary_grad(dy, cos, sin):
    dy = dy.astype(np.float64)
    cos, sin = _broadcastable(cos, dy), _broadcastable(sin, dy)
    return dy * cos + rotate_half_transposed(dy * sin)


# ---------------------------------------------------------------- C++ sandbox: fast path and scalar reference


# Row counts that are not multiples of the 2 threads' static chunks (0, 1, odd), and odd row widths.
ln_shapes = st.tuples(st.integers(0, 7), st.integers(1, 37), st.sampled_from([1, 2, 3, 17, 63, 64, 80, 255, 256, 1280]))


@settings(max_examples=40, deadline=None)
@given(shape=ln_shapes, seed=st.integers(0, 2**16))
def test_layer_norm_kernel_fast_and_reference_match_numpy(shape, seed):
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.01, 100)
    # An offset of up to 3 standard deviations: the statistics must not cancel for rows away from zero.
    x = (rng.standard_normal(shape) * scale + rng.uniform(-3, 3) * scale).astype(np.float32)
    w, b = (rng.standard_normal(shape[-1]).astype(np.float32) for _ in range(2))
    dy = rng.standard_normal(shape).astype(np.float32)
    c = host_module()
    want = numpy_layer_norm(x, w, b, EPS)
    want_dx, want_dw, want_db = numpy_layer_norm_grads(dy, x, w, EPS)
    # Error budget: float32 rounding of the terms, plus the float32 fast path's x - mean, which loses the bits of
    # |x| that lie above the row's spread: kappa = max|x| / std per row (1-3 for most rows, large for a short row
    # whose few values happen to lie close together far from zero).
    x64 = x.astype(np.float64)
    n = shape[-1]
    rstd = 1.0 / np.sqrt(x64.var(-1, keepdims=True) + EPS) if x.size else x64
    xhat = (x64 - x64.mean(-1, keepdims=True)) * rstd if x.size else x64
    kappa_u = 4 * 2.0**-24 * np.abs(x64).max(-1, keepdims=True, initial=0) * rstd
    xhat_err = 2e-6 * np.abs(xhat) + kappa_u  # absolute error bound of the normalised x
    tol_y = 2e-6 * np.abs(want).max(initial=0) + xhat_err * np.abs(w)
    # dx is a difference of terms that cancel (exactly, for rows of one element): bounded by the terms' size; dw
    # and db are sums over rows that may cancel too: bounded by the sums of the terms' error bounds.
    tol_dx = 10 * (2e-6 + kappa_u) * np.abs(w * dy * rstd).max(-1, keepdims=True, initial=0)
    tol_dw = (xhat_err * np.abs(dy)).reshape(-1, n).sum(0)
    tol_db = 2e-6 * np.abs(dy).reshape(-1, n).sum(0)
    for reference in (True, False):
        y = c.layer_norm_forward(x, w, b, EPS, reference)
        dx, dw, db = c.layer_norm_backward(dy, x, w, EPS, reference)
        for name, got, ref, tol in (("y", y, want, tol_y), ("dx", dx, want_dx, tol_dx), ("dw", dw, want_dw, tol_dw)):
            assert (np.abs(got - ref) <= tol + 1e-30).all(), f"{name} (reference={reference})"
        assert (np.abs(db - want_db) <= tol_db + 1e-30).all(), f"db (reference={reference})"


rotary_layouts = st.sampled_from(
    [
        ((), False),  # x [N, D], cos [1, D]
        ((7,), False),  # vision: x [T, N, D], cos [T, 1, D]
        ((9,), True),  # x [T, N, D], cos [T, D]
        ((2, 5), False),  # text: x [B, S, N, D], cos [B, S, 1, D]
        ((1, 13), True),
        ((0, 3), False),
    ]
)


@settings(max_examples=40, deadline=None)
@given(
    layout=rotary_layouts,
    heads=st.integers(1, 5),
    dim=st.sampled_from([2, 10, 64, 80, 128]),
    seed=st.integers(0, 2**16),
)
def test_rotary_kernel_fast_and_reference_match_numpy(layout, heads, dim, seed):
    lead, flat_cos = layout
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*lead, heads, dim)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    # Arbitrary values, not cos/sin of angles: real rotary tables repeat each half (cos[c] == cos[c + D/2]), which
    # would hide a mix-up of the two halves' entries.
    table_shape = (*lead, dim) if flat_cos else (*lead, 1, dim)
    cos, sin = (rng.standard_normal(table_shape).astype(np.float32) for _ in range(2))
    c = host_module()
    for reference in (True, False):
        assert_rel_close(c.rotary_forward(x, cos, sin, reference), numpy_rotary(x, cos, sin), 1e-6, "y")
        assert_rel_close(c.rotary_backward(dy, cos, sin, reference), numpy_rotary_grad(dy, cos, sin), 1e-6, "dx")


def test_rotary_backward_is_the_transpose_of_the_forward():
    """<rot(x), dy> == <x, rot^T(dy)>: the backward kernel is the adjoint of the forward one."""
    rng = np.random.default_rng(3)
    x, dy = (rng.standard_normal((11, 4, 64)).astype(np.float32) for _ in range(2))
    cos, sin = (rng.standard_normal((11, 1, 64)).astype(np.float32) for _ in range(2))
    c = host_module()
    lhs = (c.rotary_forward(x, cos, sin).astype(np.float64) * dy).sum()
    rhs = (x * c.rotary_backward(dy, cos, sin).astype(np.float64)).sum()
    assert abs(lhs - rhs) <= 1e-5 * np.abs(x).sum()


def test_layer_norm_backward_is_deterministic():
    rng = np.random.default_rng(4)
    x, dy = (rng.standard_normal((1001, 256)).astype(np.float32) for _ in range(2))
    w = rng.standard_normal(256).astype(np.float32)
    c = host_module()
    first, second = c.layer_norm_backward(dy, x, w, EPS), c.layer_norm_backward(dy, x, w, EPS)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_kernels_reject_bad_shapes():
    c = host_module()
    x = np.zeros((2, 8), np.float32)
    v8, v7 = np.zeros(8, np.float32), np.zeros(7, np.float32)
    with pytest.raises(ValueError, match=r"weight must have shape \[8\]"):
        c.layer_norm_forward(x, v7, v8, EPS)
    with pytest.raises(ValueError, match="bias must have weight's shape"):
        c.layer_norm_forward(x, v8, v7, EPS)
    with pytest.raises(ValueError, match="dy must have x's shape"):
        c.layer_norm_backward(np.zeros((3, 8), np.float32), x, v8, EPS)
    with pytest.raises(ValueError, match="eps must be positive"):
        c.layer_norm_forward(x, v8, v8, 0.0)
    q = np.zeros((3, 2, 8), np.float32)
    with pytest.raises(ValueError, match="head_dim must be even"):
        c.rotary_forward(np.zeros((3, 2, 7), np.float32), np.zeros((3, 1, 7), np.float32), np.zeros((3, 1, 7)))
    with pytest.raises(ValueError, match=r"cos and sin must be .* got \[3, 2, 8\]"):
        c.rotary_forward(q, q, q)
    with pytest.raises(ValueError, match=r"got \[4, 8\]"):
        c.rotary_backward(q, np.zeros((3, 8), np.float32), np.zeros((4, 8), np.float32))
    with pytest.raises(ValueError, match="x must be"):
        c.rotary_forward(np.zeros(8, np.float32), np.zeros(8, np.float32), np.zeros(8, np.float32))


# ---------------------------------------------------------------- MindSpore ops vs the compositions


def _ln_loss_and_grads(fn, x, w, b, g):
    return ms.value_and_grad(lambda x, w, b: (fn(x, w, b) * g).sum(), grad_position=(0, 1, 2))(x, w, b)


def _rotary_loss_and_grads(fn, x, cos, sin, g):
    return ms.value_and_grad(lambda x, c, s: (fn(x, c, s) * g).sum(), grad_position=(0, 1, 2))(x, cos, sin)


def _ln_inputs(shape, seed):
    rng = np.random.default_rng(seed)
    x = Tensor((rng.standard_normal(shape) * 2 + 0.5).astype(np.float32))
    w, b = (Tensor(rng.standard_normal(shape[-1]).astype(np.float32)) for _ in range(2))
    return x, w, b, Tensor(rng.standard_normal(shape).astype(np.float32))


def _rotary_inputs(x_shape, table_shape, seed):
    rng = np.random.default_rng(seed)
    x, g = (Tensor(rng.standard_normal(x_shape).astype(np.float32)) for _ in range(2))
    cos, sin = (Tensor(rng.standard_normal(table_shape).astype(np.float32)) for _ in range(2))
    return x, cos, sin, g


@pytest.mark.parametrize("shape", [(1, 256), (3, 7, 80), (5, 1280), (2, 33, 255)])
def test_layer_norm_op_matches_reference_values_and_gradients(shape):
    x, w, b, g = _ln_inputs(shape, 0)
    op = LayerNormOp(EPS)
    assert op.backend == "cpu_kernel", explain_layer_norm()
    loss, grads = _ln_loss_and_grads(op, x, w, b, g)
    ref_loss, ref_grads = _ln_loss_and_grads(ln_reference, x, w, b, g)
    assert_rel_close(op(x, w, b).asnumpy(), layer_norm_reference(x, w, b, EPS).asnumpy(), 1e-6, "y")
    assert_rel_close(loss.asnumpy(), ref_loss.asnumpy(), 1e-5, "loss")
    for name, got, want in zip(("dx", "dw", "db"), grads, ref_grads):
        assert_rel_close(got.asnumpy(), want.asnumpy(), 1e-5, name)


# The text model's q ([B, S, N, D] with [B, S, 1, D]) and the vision tower's ([T, N, D] with [T, 1, D] or [T, D]).
ROTARY_CASES = [((2, 9, 3, 64), (2, 9, 1, 64)), ((37, 5, 80), (37, 1, 80)), ((37, 5, 80), (37, 80))]


@pytest.mark.parametrize("x_shape, table_shape", ROTARY_CASES)
def test_rotary_op_matches_reference_values_and_gradients(x_shape, table_shape):
    x, cos, sin, g = _rotary_inputs(x_shape, table_shape, 0)
    op = Rotary()
    assert op.backend == "cpu_kernel", explain_rotary()
    loss, (dx, dcos, dsin) = _rotary_loss_and_grads(op, x, cos, sin, g)
    ref_loss, (ref_dx, _, _) = _rotary_loss_and_grads(apply_rotary_reference, x, cos, sin, g)
    assert_rel_close(op(x, cos, sin).asnumpy(), apply_rotary_reference(x, cos, sin).asnumpy(), 1e-6, "y")
    assert_rel_close(loss.asnumpy(), ref_loss.asnumpy(), 1e-5, "loss")
    assert_rel_close(dx.asnumpy(), ref_dx.asnumpy(), 1e-6, "dx")
    # The tables are position constants in the model: by contract they get zeros, not the composition's gradient.
    assert not dcos.asnumpy().any() and not dsin.asnumpy().any()


ln_for_jit = LayerNormOp(EPS)
rotary_for_jit = Rotary()


@ms.jit
def jit_ln_loss_and_grads(x, w, b, g):
    return ms.value_and_grad(lambda x, w, b: (ln_for_jit(x, w, b) * g).sum(), grad_position=(0, 1, 2))(x, w, b)


def ln_reference(x, w, b):
    return layer_norm_reference(x, w, b, EPS)


@ms.jit
def jit_ln_reference_loss_and_grads(x, w, b, g):
    return ms.value_and_grad(lambda x, w, b: (ln_reference(x, w, b) * g).sum(), grad_position=(0, 1, 2))(x, w, b)


@ms.jit
def jit_rotary_loss_and_grads(x, cos, sin, g):
    return ms.value_and_grad(lambda x: (rotary_for_jit(x, cos, sin) * g).sum())(x)


@ms.jit
def jit_rotary_reference_loss_and_grads(x, cos, sin, g):
    return ms.value_and_grad(lambda x: (apply_rotary_reference(x, cos, sin) * g).sum())(x)


def test_layer_norm_op_under_jit_matches_pynative_and_reference():
    x, w, b, g = _ln_inputs((4, 9, 80), 1)
    loss, grads = jit_ln_loss_and_grads(x, w, b, g)
    eager_loss, eager_grads = _ln_loss_and_grads(ln_for_jit, x, w, b, g)
    ref_loss, ref_grads = jit_ln_reference_loss_and_grads(x, w, b, g)
    assert_rel_close(loss.asnumpy(), eager_loss.asnumpy(), 1e-6, "loss")
    assert_rel_close(loss.asnumpy(), ref_loss.asnumpy(), 1e-5, "loss vs reference")
    for name, got, eager, ref in zip(("dx", "dw", "db"), grads, eager_grads, ref_grads):
        assert_rel_close(got.asnumpy(), eager.asnumpy(), 1e-6, name)
        assert_rel_close(got.asnumpy(), ref.asnumpy(), 1e-5, name + " vs reference")


@pytest.mark.parametrize("x_shape, table_shape", [ROTARY_CASES[0], ROTARY_CASES[1]])
def test_rotary_op_under_jit_matches_pynative_and_reference(x_shape, table_shape):
    x, cos, sin, g = _rotary_inputs(x_shape, table_shape, 1)
    loss, dx = jit_rotary_loss_and_grads(x, cos, sin, g)
    eager_loss, (eager_dx, _, _) = _rotary_loss_and_grads(rotary_for_jit, x, cos, sin, g)
    ref_loss, ref_dx = jit_rotary_reference_loss_and_grads(x, cos, sin, g)
    assert_rel_close(loss.asnumpy(), eager_loss.asnumpy(), 1e-6, "loss")
    assert_rel_close(dx.asnumpy(), eager_dx.asnumpy(), 1e-6, "dx")
    assert_rel_close(loss.asnumpy(), ref_loss.asnumpy(), 1e-5, "loss vs reference")
    assert_rel_close(dx.asnumpy(), ref_dx.asnumpy(), 1e-6, "dx vs reference")


# ---------------------------------------------------------------- vs torch / transformers


def test_layer_norm_op_matches_torch_values_and_gradients():
    torch = pytest.importorskip("torch")
    x, w, b, g = _ln_inputs((6, 11, 256), 2)
    loss, grads = _ln_loss_and_grads(LayerNormOp(EPS), x, w, b, g)
    tx, tw, tb = (torch.from_numpy(t.asnumpy()).requires_grad_(True) for t in (x, w, b))
    ty = torch.nn.functional.layer_norm(tx, (256,), tw, tb, EPS)
    t_grads = torch.autograd.grad(ty, (tx, tw, tb), torch.from_numpy(g.asnumpy()))
    assert_rel_close(LayerNormOp(EPS)(x, w, b).asnumpy(), ty.detach().numpy(), 1e-5, "y")
    assert_rel_close(loss.asnumpy(), (ty * torch.from_numpy(g.asnumpy())).sum().item(), 1e-5, "loss")
    for name, got, want in zip(("dx", "dw", "db"), grads, t_grads):
        assert_rel_close(got.asnumpy(), want.numpy(), 1e-5, name)


def test_rotary_op_matches_transformers_text_and_vision():
    torch = pytest.importorskip("torch")
    from transformers.models.qwen2 import modeling_qwen2
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni

    rng = np.random.default_rng(5)
    # Text: q [B, S, N, D] with cos/sin [B, S, D] unsqueezed at the heads axis (transformers' BSND option). The
    # half-split rotary of Qwen2; the Omni thinker's mRoPE builds its cos/sin differently, then applies the same.
    q, k, g = (rng.standard_normal((2, 17, 4, 64)).astype(np.float32) for _ in range(3))
    cos, sin = (rng.standard_normal((2, 17, 64)).astype(np.float32) for _ in range(2))
    tq, tk = torch.from_numpy(q).requires_grad_(True), torch.from_numpy(k)
    want, _ = modeling_qwen2.apply_rotary_pos_emb(tq, tk, torch.from_numpy(cos), torch.from_numpy(sin), unsqueeze_dim=2)
    (want_dx,) = torch.autograd.grad(want, tq, torch.from_numpy(g))
    ms_cos, ms_sin = Tensor(cos.reshape(2, 17, 1, 64)), Tensor(sin.reshape(2, 17, 1, 64))
    _, (dx, _, _) = _rotary_loss_and_grads(Rotary(), Tensor(q), ms_cos, ms_sin, Tensor(g))
    assert_rel_close(apply_rotary(Tensor(q), ms_cos, ms_sin).asnumpy(), want.detach().numpy(), 1e-5, "text y")
    assert_rel_close(dx.asnumpy(), want_dx.numpy(), 1e-5, "text dx")
    # Vision: x [T, N, D] and the frequencies [T, D/2] that transformers turns into cos/sin itself.
    x = rng.standard_normal((50, 3, 80)).astype(np.float32)
    freqs = rng.uniform(0, 30, (50, 40)).astype(np.float32)
    want = modeling_qwen2_5_omni.apply_rotary_pos_emb_vision(torch.from_numpy(x)[None], torch.from_numpy(freqs))[0]
    emb = np.concatenate([freqs, freqs], -1).reshape(50, 1, 80)
    got = apply_rotary(Tensor(x), ms.ops.cos(Tensor(emb)), ms.ops.sin(Tensor(emb)))
    assert_rel_close(got.asnumpy(), want.numpy(), 1e-5, "vision y")


def _bf16(a: np.ndarray) -> Tensor:
    return Tensor(a).astype(ms.bfloat16)


def _within_one_bf16_ulp(got: np.ndarray, want: np.ndarray, name: str) -> None:
    """Both sides round a float32 result once, but their float32 results may differ in the last bits (summation
    order, FMA), which moves a value near a rounding boundary to the neighbouring bf16 value."""
    with np.errstate(divide="ignore"):
        ulp = np.exp2(np.floor(np.log2(np.abs(want))) - 7)  # bf16 keeps 8 significant bits; 0 for want == 0
    assert (np.abs(got - want) <= ulp).all(), f"{name}: more than one bf16 ulp off"


def test_bfloat16_storage_rounds_once_like_torch():
    torch = pytest.importorskip("torch")
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import rotate_half as hf_rotate_half

    rng = np.random.default_rng(6)
    x = rng.standard_normal((6, 255)).astype(np.float32)
    w, b = (rng.standard_normal(255).astype(np.float32) for _ in range(2))
    got = LayerNormOp(EPS, ms.bfloat16)(_bf16(x), _bf16(w), _bf16(b))
    assert got.dtype == ms.bfloat16
    tx, tw, tb = (torch.from_numpy(a).bfloat16() for a in (x, w, b))
    want = torch.nn.functional.layer_norm(tx, (255,), tw, tb, EPS)
    _within_one_bf16_ulp(got.astype(ms.float32).asnumpy(), want.float().numpy(), "layer_norm y")

    q = rng.standard_normal((2, 9, 3, 64)).astype(np.float32)
    cos, sin = (rng.standard_normal((2, 9, 1, 64)).astype(np.float32) for _ in range(2))
    got = Rotary(ms.bfloat16)(_bf16(q), _bf16(cos), _bf16(sin))
    assert got.dtype == ms.bfloat16
    # transformers' vision rotary: float32 arithmetic on the bf16 values, one rounding back to bf16.
    tq, tc, ts = (torch.from_numpy(a).bfloat16().float() for a in (q, cos, sin))
    want = (tq * tc + hf_rotate_half(tq) * ts).bfloat16()
    _within_one_bf16_ulp(got.astype(ms.float32).asnumpy(), want.float().numpy(), "rotary y")


def test_bfloat16_gradients_match_float64_within_bf16_precision():
    # The losses are taken in float32 (MindSpore has no bf16 CPU Mul); the cast's backward hands the kernels a bf16
    # dy, which is what the oracle gets too.
    rng = np.random.default_rng(7)
    x, g = (rng.standard_normal((5, 80)).astype(np.float32) for _ in range(2))
    w, b = (rng.standard_normal(80).astype(np.float32) for _ in range(2))
    xb, wb, bb = (_bf16(a) for a in (x, w, b))
    ln = LayerNormOp(EPS, ms.bfloat16)
    _, grads = _ln_loss_and_grads(lambda x, w, b: ln(x, w, b).astype(ms.float32), xb, wb, bb, Tensor(g))
    up = [t.astype(ms.float32).asnumpy() for t in (xb, wb, _bf16(g))]
    want = numpy_layer_norm_grads(up[2], up[0], up[1], EPS)
    for name, got, ref in zip(("dx", "dw", "db"), grads, want):
        assert got.dtype == ms.bfloat16
        assert_rel_close(got.astype(ms.float32).asnumpy(), ref, 1e-2, name)

    q, gq = (rng.standard_normal((7, 3, 64)).astype(np.float32) for _ in range(2))
    cos, sin = (rng.standard_normal((7, 1, 64)).astype(np.float32) for _ in range(2))
    qb, cb, sb = (_bf16(a) for a in (q, cos, sin))
    rot = Rotary(ms.bfloat16)
    _, (dx, _, _) = _rotary_loss_and_grads(lambda x, c, s: rot(x, c, s).astype(ms.float32), qb, cb, sb, Tensor(gq))
    up = [t.astype(ms.float32).asnumpy() for t in (_bf16(gq), cb, sb)]
    assert dx.dtype == ms.bfloat16
    assert_rel_close(dx.astype(ms.float32).asnumpy(), numpy_rotary_grad(*up), 1e-2, "rotary dx")


# ---------------------------------------------------------------- faces


def test_faces_validate_and_explain():
    x = Tensor(np.zeros((2, 8), np.float32))
    v8 = Tensor(np.zeros(8, np.float32))
    with pytest.raises(ValueError, match=r"weight has shape \(7,\), expected \(8,\)"):
        layer_norm(x, Tensor(np.zeros(7, np.float32)), v8, EPS)
    with pytest.raises(ValueError, match=r"bias has shape \(7,\)"):
        layer_norm(x, v8, Tensor(np.zeros(7, np.float32)), EPS)
    with pytest.raises(ValueError, match="bias dtype"):
        layer_norm(x, v8, Tensor(np.zeros(8, np.float16)), EPS)
    with pytest.raises(ValueError, match="eps must be positive"):
        LayerNormOp(0.0)
    q = Tensor(np.zeros((3, 2, 8), np.float32))
    t = Tensor(np.zeros((3, 1, 8), np.float32))
    with pytest.raises(ValueError, match="even head_dim"):
        apply_rotary(Tensor(np.zeros((3, 2, 7), np.float32)), t, t)
    with pytest.raises(ValueError, match=r"cos has shape \(1, 1, 8\), expected \(3, 1, 8\) or \(3, 8\)"):
        apply_rotary(q, Tensor(np.zeros((1, 1, 8), np.float32)), t)
    with pytest.raises(ValueError, match="sin dtype"):
        apply_rotary(q, t, Tensor(np.zeros((3, 1, 8), np.float16)))
    # float16 has no kernel: the reference serves it, and the dispatcher says why.
    assert LayerNormOp(EPS, ms.float16).backend == "reference"
    assert Rotary(ms.float16).backend == "reference"
    assert "dtype Float16 is not float32 or bfloat16" in explain_layer_norm(ms.float16)
    assert "dtype Float16 is not float32 or bfloat16" in explain_rotary(ms.float16)
    assert "device is CPU, not Ascend" in explain_rotary(ms.float32)


def test_forced_reference_backend(monkeypatch):
    monkeypatch.setenv("OMNI_FAST_BACKEND", "reference")
    assert LayerNormOp(EPS).backend == "reference"
    assert Rotary().backend == "reference"
    monkeypatch.setenv("OMNI_FAST_BACKEND", "ascend")
    with pytest.raises(ValueError, match="cannot serve layer_norm: device is CPU"):
        LayerNormOp(EPS)
    with pytest.raises(ValueError, match="cannot serve rotary: device is CPU"):
        Rotary()
