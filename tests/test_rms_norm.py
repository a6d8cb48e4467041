"""The pilot kernel, fused RMSNorm: C++ fast path vs its scalar reference vs numpy, and the MindSpore op's
values and gradients vs the plain MindSpore reference, in PyNative and under ms.jit."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from conftest import assert_rel_close
from hypothesis import given, settings
from hypothesis import strategies as st
from mindspore import Tensor

from omni_fast.ops import rms_norm
from omni_fast.ops.library import host_module
from omni_fast.ops.reference import rms_norm_reference
from omni_fast.ops.rms_norm import RmsNorm, explain

EPS = 1e-6


def numpy_rms_norm(x, w, eps):
    x = x.astype(np.float64)
    return w * x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


def numpy_rms_norm_grads(dy, x, w, eps):
    x, dy, w = x.astype(np.float64), dy.astype(np.float64), w.astype(np.float64)
    n = x.shape[-1]
    r = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    g = w * dy
    dx = r * g - x * r**3 * (g * x).sum(-1, keepdims=True) / n
    dw = (dy * x * r).reshape(-1, n).sum(0)
    return dx, dw


shapes = st.tuples(st.integers(0, 7), st.integers(1, 5), st.sampled_from([1, 3, 16, 63, 64, 80, 127, 1280]))


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_kernel_fast_and_reference_match_numpy(shape, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * rng.uniform(0.01, 100)).astype(np.float32)
    w = rng.standard_normal(shape[-1]).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    c = host_module()
    want = numpy_rms_norm(x, w, EPS)
    want_dx, want_dw = numpy_rms_norm_grads(dy, x, w, EPS)
    for reference in (True, False):
        assert_rel_close(c.rms_norm_forward(x, w, EPS, reference), want, 2e-6, "y")
        dx, dw = c.rms_norm_backward(dy, x, w, EPS, reference)
        # dx is a difference of two terms that cancel for short rows; bound the error by the terms' size.
        term = np.abs(w * dy / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + EPS)).max(initial=0)
        assert np.abs(dx - want_dx).max(initial=0) <= 2e-5 * term, "dx"
        # dw sums rows whose terms may cancel (e.g. 3 rows of 1 column); bound the error by the terms' size too.
        r = 1.0 / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + EPS)
        dw_terms = np.abs(dy * x * r).reshape(-1, shape[-1]).sum(0).max(initial=0)
        assert np.abs(dw - want_dw).max(initial=0) <= 2e-5 * max(dw_terms, 1e-30), "dw"


def test_kernel_rejects_bad_shapes():
    c = host_module()
    x = np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError, match=r"weight must have shape \[8\]"):
        c.rms_norm_forward(x, np.zeros(7, np.float32), EPS)
    with pytest.raises(ValueError, match="dy must have x's shape"):
        c.rms_norm_backward(np.zeros((3, 8), np.float32), x, np.zeros(8, np.float32), EPS)
    with pytest.raises(ValueError, match="eps must be positive"):
        c.rms_norm_forward(x, np.zeros(8, np.float32), 0.0)


def _loss_and_grads(fn, x, w, g):
    return ms.value_and_grad(lambda x, w: (fn(x, w) * g).sum(), grad_position=(0, 1))(x, w)


@pytest.mark.parametrize("shape", [(1, 64), (3, 7, 80), (5, 1280)])
def test_custom_op_matches_reference_values_and_gradients(shape):
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal(shape).astype(np.float32))
    w = Tensor(rng.standard_normal(shape[-1]).astype(np.float32))
    g = Tensor(rng.standard_normal(shape).astype(np.float32))
    op = RmsNorm(EPS)
    assert op.backend == "cpu_kernel", explain()
    loss, (dx, dw) = _loss_and_grads(op, x, w, g)
    ref_loss, (ref_dx, ref_dw) = _loss_and_grads(lambda x, w: rms_norm_reference(x, w, EPS), x, w, g)
    assert_rel_close(op(x, w).asnumpy(), rms_norm_reference(x, w, EPS).asnumpy(), 1e-6, "y")
    assert_rel_close(loss.asnumpy(), ref_loss.asnumpy(), 1e-5, "loss")
    assert_rel_close(dx.asnumpy(), ref_dx.asnumpy(), 1e-5, "dx")
    assert_rel_close(dw.asnumpy(), ref_dw.asnumpy(), 1e-5, "dw")


op_for_jit = RmsNorm(EPS)


@ms.jit
def jit_loss_and_grads(x, w, g):
    return ms.value_and_grad(lambda x, w: (op_for_jit(x, w) * g).sum(), grad_position=(0, 1))(x, w)


def test_custom_op_under_jit_matches_pynative():
    rng = np.random.default_rng(1)
    x, g = (Tensor(rng.standard_normal((4, 9, 64)).astype(np.float32)) for _ in range(2))
    w = Tensor(rng.standard_normal(64).astype(np.float32))
    loss, (dx, dw) = jit_loss_and_grads(x, w, g)
    ref_loss, (ref_dx, ref_dw) = _loss_and_grads(op_for_jit, x, w, g)
    assert_rel_close(loss.asnumpy(), ref_loss.asnumpy(), 1e-6, "loss")
    assert_rel_close(dx.asnumpy(), ref_dx.asnumpy(), 1e-6, "dx")
    assert_rel_close(dw.asnumpy(), ref_dw.asnumpy(), 1e-6, "dw")


def test_bfloat16_storage_rounds_like_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 80)).astype(np.float32)
    w = rng.standard_normal(80).astype(np.float32)
    xb, wb = torch.from_numpy(x).bfloat16(), torch.from_numpy(w).bfloat16()
    # transformers' Qwen2RMSNorm in bf16: fp32 statistics, cast to bf16, then times the bf16 weight.
    x32 = xb.float()
    want = wb * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS)).to(torch.bfloat16)
    got = RmsNorm(EPS, ms.bfloat16)(Tensor(x).astype(ms.bfloat16), Tensor(w).astype(ms.bfloat16))
    assert got.dtype == ms.bfloat16
    np.testing.assert_array_equal(got.astype(ms.float32).asnumpy(), want.float().numpy())


def test_face_validates_and_explains():
    x = Tensor(np.zeros((2, 8), np.float32))
    with pytest.raises(ValueError, match=r"weight has shape \(7,\), expected \(8,\)"):
        rms_norm(x, Tensor(np.zeros(7, np.float32)), EPS)
    with pytest.raises(ValueError, match="weight dtype"):
        rms_norm(x, Tensor(np.zeros(8, np.float16)), EPS)
    with pytest.raises(ValueError, match="eps must be positive"):
        RmsNorm(0.0)
    # float16 has no kernel: the reference serves it, and the dispatcher says why.
    assert RmsNorm(EPS, ms.float16).backend == "reference"
    assert "dtype Float16 is not float32 or bfloat16" in explain(ms.float16)
    assert "device is CPU, not Ascend" in explain(ms.float32)


def test_forced_reference_backend(monkeypatch):
    monkeypatch.setenv("OMNI_FAST_BACKEND", "reference")
    assert RmsNorm(EPS).backend == "reference"
    monkeypatch.setenv("OMNI_FAST_BACKEND", "ascend")
    with pytest.raises(ValueError, match="cannot serve rms_norm: device is CPU"):
        RmsNorm(EPS)
    monkeypatch.setenv("OMNI_FAST_BACKEND", "gpu")
    with pytest.raises(ValueError, match="expected one of"):
        RmsNorm(EPS)
