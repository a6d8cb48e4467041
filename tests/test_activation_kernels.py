"""Fused SwiGLU and GELU: C++ fast path vs its scalar reference vs numpy float64, and the MindSpore ops' values and
gradients vs the plain MindSpore compositions (PyNative and ms.jit) and vs torch."""

from __future__ import annotations

import math

import mindspore as ms
import numpy as np
import pytest
from conftest import assert_rel_close
from hypothesis import given, settings
from hypothesis import strategies as st
from mindspore import Tensor

from omni_fast.ops import gelu, swiglu
from omni_fast.ops.activation import Gelu, SwiGLU, explain
from omni_fast.ops.library import host_module
from omni_fast.ops.reference import gelu_reference, swiglu_reference

# Below ~1e-37 the kernels flush exp to 0 (subnormal results); nothing else may differ absolutely by more.
TINY = 1e-30


def np_sigmoid(x):
    e = np.exp(-np.abs(x))  # never overflows: both branches of the stable form from exp(-|x|)
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


np_erfc = np.vectorize(math.erfc, otypes=[np.float64])


def numpy_swiglu(g, u, dy):
    """(out, d_gate, d_up) in float64."""
    g, u, dy = (a.astype(np.float64) for a in (g, u, dy))
    s = np_sigmoid(g)
    return g * s * u, dy * u * s * (1 + g * (1 - s)), dy * g * s


def numpy_gelu(x, dy):
    """(y, dx, Phi(x), phi(x)) in float64."""
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    cdf = 0.5 * np_erfc(-x / math.sqrt(2))  # not 1 + erf: no cancellation for x << 0
    pdf = np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return x * cdf, dy * (cdf + x * pdf), cdf, pdf


def assert_within(actual, expected, bound, name):
    """Elementwise |actual - expected| <= bound (+ TINY): catches errors that a max-scaled bound would hide."""
    err = np.abs(np.asarray(actual, np.float64) - expected)
    bad = err > bound + TINY
    if bad.any():
        i = np.argmax(np.where(bad, err / (bound + TINY), 0))
        got = np.asarray(actual).reshape(-1)[i]
        pytest.fail(
            f"{name}: {bad.sum()} elements off, e.g. {got!r} vs {expected.reshape(-1)[i]!r} "
            f"(bound {bound.reshape(-1)[i]:.3e})"
        )


def swiglu_bounds(g, u, dy):
    """Error bounds of the float32 kernels. 1 - s is formed in float32 (as in torch), so g * (1 - s) carries up to
    |g| ulp(1) of absolute error: d_gate's bound grows with |g|."""
    g, u, dy = (a.astype(np.float64) for a in (g, u, dy))
    s = np_sigmoid(g)
    return 1e-6 * np.abs(g * s * u), 2.5e-7 * np.abs(dy * u * s) * (8 + np.abs(g)), 1e-6 * np.abs(dy * g * s)


def gelu_bounds(x, dy):
    """Error bounds of the float32 kernels, relative to each result's size (the kernels form Phi's left tail as
    erfc / 2, without cancellation). exp(-x^2 / 2) has the relative error of x^2 in float32, hence the x^2 term."""
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    y, _, cdf, pdf = numpy_gelu(x, dy)
    rtol = 6e-7 * (1 + x * x / 4)
    return rtol * np.abs(y), rtol * np.abs(dy) * (cdf + np.abs(x) * pdf)


# Sizes cross the kernels' 16384-element OpenMP block; scales reach the exp over/underflow ranges (|x| > 87).
shapes = st.tuples(st.integers(0, 4), st.sampled_from([1, 3, 17, 64, 1536, 16385]))
scales = st.sampled_from([0.01, 1.0, 4.0, 30.0, 150.0])


@settings(max_examples=30, deadline=None)
@given(shape=shapes, scale=scales, seed=st.integers(0, 2**16))
def test_swiglu_kernel_fast_and_reference_match_numpy(shape, scale, seed):
    rng = np.random.default_rng(seed)
    g = (rng.standard_normal(shape) * scale).astype(np.float32)
    u, dy = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    want = numpy_swiglu(g, u, dy)
    bounds = swiglu_bounds(g, u, dy)
    c = host_module()
    for reference in (True, False):
        got = (c.swiglu_forward(g, u, reference), *c.swiglu_backward(dy, g, u, reference))
        for name, a, w, b in zip(("out", "d_gate", "d_up"), got, want, bounds):
            assert a.shape == shape and a.dtype == np.float32
            assert_within(a, w, b, f"{name} (reference={reference})")


@settings(max_examples=30, deadline=None)
@given(shape=shapes, scale=scales, seed=st.integers(0, 2**16))
def test_gelu_kernel_fast_and_reference_match_numpy(shape, scale, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    want_y, want_dx, _, _ = numpy_gelu(x, dy)
    bound_y, bound_dx = gelu_bounds(x, dy)
    c = host_module()
    for reference in (True, False):
        assert_within(c.gelu_forward(x, reference), want_y, bound_y, f"y (reference={reference})")
        assert_within(c.gelu_backward(dy, x, reference), want_dx, bound_dx, f"dx (reference={reference})")


def test_kernels_on_special_values():
    """Around the exp/erf range ends and branch points, and non-finite inputs: the fast path gives the same
    infinities and NaNs as the formulas evaluated in double (torch's too: e.g. silu(-inf) = gelu(-inf) = NaN)."""
    edges = [0.0, 1e-30, 0.5, 0.999, 1.0, 1.001, 2.8, 3.9, 4.1, 5.7, 10.0, 30.0, 87.0, 87.5, 88.7, 89.0, 100.0, 1e4]
    x = np.array([v for e in edges for v in (e, -e)] + [np.inf, -np.inf, np.nan], np.float32)
    dy = np.linspace(-2, 2, x.size).astype(np.float32)
    u = np.linspace(3, -1, x.size).astype(np.float32)
    c = host_module()
    fast = (c.swiglu_forward(x, u), *c.swiglu_backward(dy, x, u), c.gelu_forward(x), c.gelu_backward(dy, x))
    ref = (
        c.swiglu_forward(x, u, True),
        *c.swiglu_backward(dy, x, u, True),
        c.gelu_forward(x, True),
        c.gelu_backward(dy, x, True),
    )
    finite = np.isfinite(x)
    with np.errstate(invalid="ignore", over="ignore"):
        bounds = (*swiglu_bounds(x[finite], u[finite], dy[finite]), *gelu_bounds(x[finite], dy[finite]))
    for name, a, r, b in zip(("swiglu out", "d_gate", "d_up", "gelu y", "gelu dx"), fast, ref, bounds):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(r), err_msg=name)
        np.testing.assert_array_equal(a[~finite & ~np.isnan(a)], r[~finite & ~np.isnan(r)], err_msg=name)
        assert_within(a[finite], r[finite].astype(np.float64), b, name)
    assert c.gelu_forward(np.array([np.inf], np.float32))[0] == np.inf
    assert c.swiglu_forward(np.array([np.inf], np.float32), np.array([1], np.float32))[0] == np.inf


def test_kernel_sandbox_rejects_bad_shapes():
    c = host_module()
    x = np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError, match="swiglu: up must have gate's shape"):
        c.swiglu_forward(x, np.zeros((2, 7), np.float32))
    with pytest.raises(ValueError, match="swiglu: dout must have gate's shape"):
        c.swiglu_backward(np.zeros(16, np.float32), x, x)
    with pytest.raises(ValueError, match="gelu: dout must have x's shape"):
        c.gelu_backward(np.zeros((8, 2), np.float32), x)


def _swiglu_loss_and_grads(fn, g, u, dy):
    return ms.value_and_grad(lambda g, u: (fn(g, u) * dy).sum(), grad_position=(0, 1))(g, u)


def _gelu_loss_and_grad(fn, x, dy):
    return ms.value_and_grad(lambda x: (fn(x) * dy).sum())(x)


def _random(shape, seed, scale=3.0):
    rng = np.random.default_rng(seed)
    return [Tensor((rng.standard_normal(shape) * scale).astype(np.float32)) for _ in range(3)]


@pytest.mark.parametrize("shape", [(1,), (3, 7, 80), (5, 1536), (4, 16385)])
def test_swiglu_op_matches_reference_values_and_gradients(shape):
    g, u, dy = _random(shape, 0)
    op = SwiGLU()
    assert op.backend == "cpu_kernel", explain()
    loss, (d_gate, d_up) = _swiglu_loss_and_grads(op, g, u, dy)
    ref_loss, (ref_d_gate, ref_d_up) = _swiglu_loss_and_grads(swiglu_reference, g, u, dy)
    assert_rel_close(op(g, u).asnumpy(), swiglu_reference(g, u).asnumpy(), 1e-6, "out")
    assert_rel_close(loss.asnumpy(), ref_loss.asnumpy(), 1e-5, "loss")
    assert_rel_close(d_gate.asnumpy(), ref_d_gate.asnumpy(), 1e-6, "d_gate")
    assert_rel_close(d_up.asnumpy(), ref_d_up.asnumpy(), 1e-6, "d_up")


@pytest.mark.parametrize("shape", [(1,), (3, 7, 80), (5, 1280), (4, 16385)])
def test_gelu_op_matches_reference_values_and_gradients(shape):
    x, dy, _ = _random(shape, 1)
    op = Gelu()
    assert op.backend == "cpu_kernel", explain()
    loss, dx = _gelu_loss_and_grad(op, x, dy)
    ref_loss, ref_dx = _gelu_loss_and_grad(gelu_reference, x, dy)
    assert_rel_close(op(x).asnumpy(), gelu_reference(x).asnumpy(), 1e-6, "y")
    assert_rel_close(loss.asnumpy(), ref_loss.asnumpy(), 1e-5, "loss")
    assert_rel_close(dx.asnumpy(), ref_dx.asnumpy(), 1e-6, "dx")


swiglu_for_jit = SwiGLU()
gelu_for_jit = Gelu()


@ms.jit
def jit_swiglu_loss_and_grads(g, u, dy):
    return _swiglu_loss_and_grads(swiglu_for_jit, g, u, dy)


@ms.jit
def jit_gelu_loss_and_grad(x, dy):
    return _gelu_loss_and_grad(gelu_for_jit, x, dy)


def test_ops_under_jit_match_reference():
    g, u, dy = _random((4, 9, 96), 2)
    loss, (d_gate, d_up) = jit_swiglu_loss_and_grads(g, u, dy)
    ref_loss, (ref_d_gate, ref_d_up) = _swiglu_loss_and_grads(swiglu_reference, g, u, dy)
    assert_rel_close(loss.asnumpy(), ref_loss.asnumpy(), 1e-5, "swiglu loss")
    assert_rel_close(d_gate.asnumpy(), ref_d_gate.asnumpy(), 1e-6, "d_gate")
    assert_rel_close(d_up.asnumpy(), ref_d_up.asnumpy(), 1e-6, "d_up")
    loss, dx = jit_gelu_loss_and_grad(g, dy)
    ref_loss, ref_dx = _gelu_loss_and_grad(gelu_reference, g, dy)
    assert_rel_close(loss.asnumpy(), ref_loss.asnumpy(), 1e-5, "gelu loss")
    assert_rel_close(dx.asnumpy(), ref_dx.asnumpy(), 1e-6, "dx")


def test_ops_match_torch_float32():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    g, u, dy = (t.asnumpy() for t in _random((6, 1000), 3, scale=4.0))
    tg, tu = (torch.from_numpy(a).requires_grad_(True) for a in (g, u))
    out = F.silu(tg) * tu
    t_d_gate, t_d_up = torch.autograd.grad(out, (tg, tu), torch.from_numpy(dy))
    loss, (d_gate, d_up) = _swiglu_loss_and_grads(SwiGLU(), Tensor(g), Tensor(u), Tensor(dy))
    assert_rel_close(swiglu(Tensor(g), Tensor(u)).asnumpy(), out.detach().numpy(), 1e-6, "swiglu out")
    assert_rel_close(d_gate.asnumpy(), t_d_gate.numpy(), 1e-6, "d_gate")
    assert_rel_close(d_up.asnumpy(), t_d_up.numpy(), 1e-6, "d_up")
    tx = torch.from_numpy(g).requires_grad_(True)
    y = F.gelu(tx)
    (t_dx,) = torch.autograd.grad(y, (tx,), torch.from_numpy(dy))
    loss, dx = _gelu_loss_and_grad(Gelu(), Tensor(g), Tensor(dy))
    assert_rel_close(gelu(Tensor(g)).asnumpy(), y.detach().numpy(), 1e-6, "gelu y")
    assert_rel_close(dx.asnumpy(), t_dx.numpy(), 1e-6, "gelu dx")


def test_bfloat16_storage_rounds_like_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    g, u, dy = (t.asnumpy() for t in _random((16, 300), 4, scale=2.0))
    tg, tu, tdy = (torch.from_numpy(a).bfloat16() for a in (g, u, dy))
    bg, bu, bdy = (Tensor(a).astype(ms.bfloat16) for a in (g, u, dy))

    def as_np(t):
        return t.astype(ms.float32).asnumpy()

    want = (F.silu(tg) * tu).float().numpy()  # two bf16 ops, two roundings
    got = swiglu(bg, bu)
    assert got.dtype == ms.bfloat16
    np.testing.assert_array_equal(as_np(got), want)
    np.testing.assert_array_equal(as_np(swiglu_reference(bg, bu)), want)
    # GELU: torch (like the composition) forms Phi as 1 + erf, which loses the left tail to erf's absolute error;
    # equal to torch where that does not show, and within bf16 rounding of the exact value everywhere.
    want = F.gelu(tg).float().numpy()
    x = tg.float().numpy()
    exact = numpy_gelu(x, x)[0]
    right = x > -3
    np.testing.assert_array_equal(as_np(gelu(bg))[right], want[right])
    np.testing.assert_array_equal(as_np(gelu_reference(bg))[right], want[right])
    assert_within(as_np(gelu(bg)), exact, 2.0**-8 * np.abs(exact), "bf16 gelu vs exact")  # half a bf16 ulp
    # Gradients (ms.vjp: the CPU has no bf16 Mul for a loss): the kernels round each once, torch's chain of bf16 ops
    # two or three times; about a bf16 ulp apart.
    tg.requires_grad_(True)
    tu.requires_grad_(True)
    t_d_gate, t_d_up = torch.autograd.grad(F.silu(tg) * tu, (tg, tu), tdy)
    d_gate, d_up = ms.vjp(SwiGLU(ms.bfloat16), bg, bu)[1](bdy)
    assert d_gate.dtype == d_up.dtype == ms.bfloat16
    assert_rel_close(as_np(d_gate), t_d_gate.float().numpy(), 1e-2, "d_gate")
    assert_rel_close(as_np(d_up), t_d_up.float().numpy(), 1e-2, "d_up")
    (t_dx,) = torch.autograd.grad(F.gelu(tg), (tg,), tdy)
    (dx,) = ms.vjp(Gelu(ms.bfloat16), bg)[1](bdy)
    assert_rel_close(as_np(dx), t_dx.float().numpy(), 1e-2, "gelu dx")


def test_faces_validate_and_explain():
    x = Tensor(np.zeros((2, 8), np.float32))
    with pytest.raises(ValueError, match=r"swiglu: up has shape \(2, 7\), expected gate's shape \(2, 8\)"):
        swiglu(x, Tensor(np.zeros((2, 7), np.float32)))
    with pytest.raises(ValueError, match="swiglu: up dtype BFloat16 differs from gate dtype Float32"):
        swiglu(x, x.astype(ms.bfloat16))
    with pytest.raises(ValueError, match="swiglu: gate has dtype Int32, expected float32, bfloat16 or float16"):
        swiglu(x.astype(ms.int32), x.astype(ms.int32))
    with pytest.raises(ValueError, match="gelu: x has dtype Float64"):
        gelu(x.astype(ms.float64))
    # float16 has no kernel: the composition serves it, and the dispatcher says why.
    assert SwiGLU(ms.float16).backend == Gelu(ms.float16).backend == "reference"
    assert "dtype Float16 is not float32 or bfloat16" in explain(ms.float16)
    assert "device is CPU, not Ascend" in explain(ms.float32)
    h = Tensor(np.linspace(-3, 3, 16, dtype=np.float32)).astype(ms.float16)
    assert swiglu(h, h).dtype == gelu(h).dtype == ms.float16
    assert_rel_close(gelu(h).astype(ms.float32).asnumpy(), gelu(h.astype(ms.float32)).asnumpy(), 1e-3, "f16 gelu")
    empty = Tensor(np.zeros((0, 4), np.float32))
    assert swiglu(empty, empty).shape == gelu(empty).shape == (0, 4)


def test_forced_reference_backend(monkeypatch):
    monkeypatch.setenv("OMNI_FAST_BACKEND", "reference")
    assert SwiGLU().backend == Gelu().backend == "reference"
    g, u, _ = _random((3, 5), 5)
    assert_rel_close(SwiGLU()(g, u).asnumpy(), swiglu_reference(g, u).asnumpy(), 0, "swiglu")
    monkeypatch.setenv("OMNI_FAST_BACKEND", "ascend")
    with pytest.raises(ValueError, match="cannot serve gelu: device is CPU"):
        Gelu()
