"""Fused flash attention: the C++ fast path and its scalar reference against a float64 numpy oracle (values and
dQ/dK/dV, every layout and sparse mode), the MindSpore op (PyNative and ms.jit, float32 and bfloat16) against the
same oracle and against the composed MindSpore reference, fully masked rows, and the errors of the face."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from conftest import assert_rel_close
from hypothesis import given, settings
from hypothesis import strategies as st
from mindspore import Tensor

from omni_fast.model.text import padded_row_segments
from omni_fast.ops.attention import FlashAttention, explain, flash_attention
from omni_fast.ops.library import host_module

NO_BAND = 2147483647


# ---------------------------------------------------------------- float64 oracle


def _allowed(sq: int, skv: int, mode: int, pre: int, nxt: int) -> np.ndarray:
    i, j = np.arange(sq)[:, None], np.arange(skv)[None, :]
    if mode == 2:
        return j <= i
    if mode == 3:
        return j <= i + skv - sq
    return (j - i >= -pre) & (j - i <= nxt)


def _dense(q, k, v, do, allowed, scale):
    """One batch entry: q/do [N, Sq, D], k/v [Nk, Skv, D], allowed broadcasting to [N, Sq, Skv]."""
    g = q.shape[0] // k.shape[0]
    kk, vv = np.repeat(k, g, 0), np.repeat(v, g, 0)
    s = np.where(allowed, np.einsum("nid,njd->nij", q, kk) * scale, -np.inf)
    m = s.max(-1, keepdims=True, initial=-np.inf)
    seen = np.isfinite(m)
    e = np.exp(s - np.where(seen, m, 0))
    total = e.sum(-1, keepdims=True)
    p = np.where(seen, e / np.where(seen, total, 1), 0)
    o = p @ vv
    lse = np.where(seen, m + np.log(np.where(seen, total, 1)), np.inf)[..., 0]
    ds = p * (np.einsum("nid,njd->nij", do, vv) - (do * o).sum(-1, keepdims=True))
    dq = ds @ kk * scale
    dk = np.einsum("nij,nid->njd", ds, q) * scale
    dv = np.einsum("nij,nid->njd", p, do)
    nk = k.shape[0]
    return o, lse, dq, dk.reshape(nk, g, *dk.shape[1:]).sum(1), dv.reshape(nk, g, *dv.shape[1:]).sum(1)


def oracle(q, k, v, do, heads, layout, cu_q=None, cu_kv=None, mask=None, scale=None, mode=0, pre=NO_BAND, nxt=NO_BAND):
    """(out, lse, dq, dk, dv) in float64, in the inputs' layouts (lse: q's shape without D; BSH: [B, S, N])."""
    q, k, v, do = (np.asarray(a, np.float64) for a in (q, k, v, do))
    if layout == "TND":
        d = q.shape[-1]
        scale = d**-0.5 if scale is None else scale
        out, dq, dk, dv = np.zeros_like(q), np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
        lse = np.zeros(q.shape[:2])
        q0 = kv0 = 0
        for q1, kv1 in zip(cu_q, cu_kv):
            seg = [a.transpose(1, 0, 2) for a in (q[q0:q1], k[kv0:kv1], v[kv0:kv1], do[q0:q1])]
            o, lse_s, dq_s, dk_s, dv_s = _dense(*seg, _allowed(q1 - q0, kv1 - kv0, mode, pre, nxt)[None], scale)
            out[q0:q1], lse[q0:q1], dq[q0:q1] = o.transpose(1, 0, 2), lse_s.T, dq_s.transpose(1, 0, 2)
            dk[kv0:kv1], dv[kv0:kv1] = dk_s.transpose(1, 0, 2), dv_s.transpose(1, 0, 2)
            q0, kv0 = q1, kv1
        return out, lse, dq, dk, dv

    def to_bnsd(x, n):
        if layout == "BNSD":
            return x
        if layout == "BSH":
            x = x.reshape(x.shape[0], x.shape[1], n, -1)
        return x.transpose(0, 2, 1, 3)

    def back(x):
        if layout == "BNSD":
            return x
        x = x.transpose(0, 2, 1, 3)
        return x.reshape(x.shape[0], x.shape[1], -1) if layout == "BSH" else x

    d = q.shape[-1] // heads if layout == "BSH" else q.shape[-1]
    n_kv = k.shape[-1] // d if layout == "BSH" else None
    qb, kb, vb, dob = to_bnsd(q, heads), to_bnsd(k, n_kv), to_bnsd(v, n_kv), to_bnsd(do, heads)
    scale = d**-0.5 if scale is None else scale
    sq, skv = qb.shape[2], kb.shape[2]
    results = []
    for b in range(qb.shape[0]):
        allowed = _allowed(sq, skv, mode, pre, nxt)[None]
        if mask is not None:
            m = mask if mask.ndim == 2 else mask[b if mask.shape[0] > 1 else 0]
            allowed = allowed & ~m.astype(bool)
        results.append(_dense(qb[b], kb[b], vb[b], dob[b], allowed, scale))
    o, lse, dq, dk, dv = (np.stack([r[i] for r in results]) for i in range(5))
    return back(o), (lse if layout == "BNSD" else lse.transpose(0, 2, 1)), back(dq), back(dk), back(dv)


# ---------------------------------------------------------------- random cases


def make_case(rng, layout, heads, kv_heads, d, sq, skv, batch=2, lengths=None, kv_lengths=None, mask_kind=None):
    """Random float32 q, k, v, dout and the kwargs shared by the sandbox and the oracle."""
    kw = {}
    if layout == "TND":
        cu_q = np.cumsum(lengths)
        cu_kv = np.cumsum(kv_lengths if kv_lengths is not None else lengths)
        q_shape, kv_shape = (int(cu_q[-1]), heads, d), (int(cu_kv[-1]), kv_heads, d)
        kw = {"cu_q": cu_q.astype(np.int64), "cu_kv": cu_kv.astype(np.int64)}
    elif layout == "BNSD":
        q_shape, kv_shape = (batch, heads, sq, d), (batch, kv_heads, skv, d)
    elif layout == "BSND":
        q_shape, kv_shape = (batch, sq, heads, d), (batch, skv, kv_heads, d)
    else:
        q_shape, kv_shape = (batch, sq, heads * d), (batch, skv, kv_heads * d)
    q, do = (rng.standard_normal(q_shape).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal(kv_shape).astype(np.float32) for _ in range(2))
    if mask_kind == "batch":
        kw["mask"] = rng.random((batch, 1, sq, skv)) < 0.4
    elif mask_kind == "heads":
        kw["mask"] = rng.random((batch, heads, sq, skv)) < 0.4
    elif mask_kind == "shared":
        kw["mask"] = rng.random((sq, skv)) < 0.4
    return q, k, v, do, kw


def check_sandbox(q, k, v, do, heads, layout, kw, mode=0, pre=NO_BAND, nxt=NO_BAND, scale=None, rtol=3e-5):
    c = host_module()
    want = oracle(q, k, v, do, heads, layout, kw.get("cu_q"), kw.get("cu_kv"), kw.get("mask"), scale, mode, pre, nxt)
    args = dict(kw, sparse_mode=mode, pre_tokens=pre, next_tokens=nxt, scale=scale)
    for reference in (True, False):
        out, lse = c.attention_forward(q, k, v, heads, layout, reference=reference, **args)
        grads = c.attention_backward(do, q, k, v, out, lse, heads, layout, reference=reference, **args)
        for name, got, exp in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), want):
            assert not np.isnan(got).any(), name
            finite = np.isfinite(exp)
            assert np.array_equal(np.isfinite(got), finite), f"{name}: rows seeing no key must (only) give lse=+inf"
            # Gradients are differences of O(1) terms (unit-normal inputs) that can cancel to ~0 (one key: dq = 0
            # exactly); bound the error by max(|expected|, 1) rather than by a vanishing maximum.
            err = np.abs(got[finite] - exp[finite]).max(initial=0.0)
            scale_ = max(np.abs(exp[finite]).max(initial=0.0), 1.0)
            path = "reference" if reference else "fast"
            assert err <= rtol * scale_, f"{name} ({path}): {err:.2e} > {rtol} * {scale_}"


head_dims = st.sampled_from([64, 80, 128, 1, 17, 72])
gqa = st.sampled_from([(1, 1), (4, 1), (4, 4), (7, 1), (2, 1)])


@settings(max_examples=25, deadline=None)
@given(
    layout=st.sampled_from(["BNSD", "BSND", "BSH"]),
    mode=st.sampled_from([0, 2, 3]),
    d=head_dims,
    heads=gqa,
    sq=st.integers(1, 140),
    skv=st.integers(1, 140),
    mask_kind=st.sampled_from([None, "batch", "heads", "shared"]),
    band=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fixed_length_layouts_match_float64(layout, mode, d, heads, sq, skv, mask_kind, band, seed):
    rng = np.random.default_rng(seed)
    mask_kind = mask_kind if mode == 0 else None
    pre, nxt = (int(rng.integers(0, 40)), int(rng.integers(0, 40))) if band and mode == 0 else (NO_BAND, NO_BAND)
    q, k, v, do, kw = make_case(rng, layout, heads[0], heads[1], d, sq, skv, mask_kind=mask_kind)
    check_sandbox(q, k, v, do, heads[0], layout, kw, mode, pre, nxt)


segment_lengths = st.lists(st.sampled_from([0, 1, 1, 2, 37, 64, 65, 100, 130]), min_size=1, max_size=5)


@settings(max_examples=25, deadline=None)
@given(
    mode=st.sampled_from([0, 2, 3]),
    d=head_dims,
    heads=gqa,
    lengths=segment_lengths,
    cross=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_varlen_tnd_matches_float64(mode, d, heads, lengths, cross, seed):
    """Segments of length 0 and 1, lengths off the 128-row blocks, and (cross) key segments of other lengths."""
    rng = np.random.default_rng(seed)
    kv_lengths = [int(n) for n in rng.integers(1, 90, len(lengths))] if cross else None
    q, k, v, do, kw = make_case(rng, "TND", heads[0], heads[1], d, 0, 0, lengths=lengths, kv_lengths=kv_lengths)
    check_sandbox(q, k, v, do, heads[0], "TND", kw, mode, scale=float(rng.uniform(0.05, 0.3)))


def test_fully_masked_rows_give_zero_output_and_gradients():
    """Bottom-right causal with more queries than keys, and a bool mask with whole rows masked."""
    rng = np.random.default_rng(0)
    c = host_module()
    q, k, v, do, kw = make_case(rng, "BNSD", 4, 2, 64, 100, 30)
    for reference in (True, False):
        out, lse = c.attention_forward(q, k, v, 4, sparse_mode=3, reference=reference)
        dq, dk, dv = c.attention_backward(do, q, k, v, out, lse, 4, sparse_mode=3, reference=reference)
        assert (out[:, :, :70] == 0).all() and (dq[:, :, :70] == 0).all()
        assert np.isinf(lse[:, :, :70]).all() and np.isfinite(lse[:, :, 70:]).all()
        assert not any(np.isnan(a).any() for a in (out, dq, dk, dv))
    mask = np.zeros((2, 1, 100, 30), bool)
    mask[:, :, 10:20] = True
    out, lse = c.attention_forward(q, k, v, 4, mask=mask)
    dq, _, _ = c.attention_backward(do, q, k, v, out, lse, 4, mask=mask)
    assert (out[:, :, 10:20] == 0).all() and (dq[:, :, 10:20] == 0).all()
    check_sandbox(q, k, v, do, 4, "BNSD", {"mask": mask})


def test_sandbox_rejects_bad_inputs():
    c = host_module()
    x = np.zeros((1, 4, 8, 16), np.float32)
    with pytest.raises(ValueError, match=r"key/value heads \(3\) must divide query heads \(4\)"):
        c.attention_forward(x, np.zeros((1, 3, 8, 16), np.float32), np.zeros((1, 3, 8, 16), np.float32), 4)
    with pytest.raises(ValueError, match="sparse_mode must be 0, 2 or 3"):
        c.attention_forward(x, x, x, 4, sparse_mode=4)
    t = np.zeros((10, 2, 16), np.float32)
    with pytest.raises(ValueError, match=r"last cumulative ends \(9, 9\) must equal"):
        c.attention_forward(t, t, t, 2, "TND", cu_q=np.array([4, 9]), cu_kv=np.array([4, 9]))
    with pytest.raises(ValueError, match="non-decreasing"):
        c.attention_forward(t, t, t, 2, "TND", cu_q=np.array([6, 4, 10]), cu_kv=np.array([6, 4, 10]))


# ---------------------------------------------------------------- the MindSpore op


def ms_value_and_grads(q, k, v, do, heads, layout, kw, mode=0, dtype=ms.float32):
    """flash_attention's output and d(sum(out * do))/d(q, k, v) as float64 numpy."""
    args = {"input_layout": layout, "sparse_mode": mode}
    if "cu_q" in kw:
        args.update(actual_seq_qlen=kw["cu_q"].tolist(), actual_seq_kvlen=kw["cu_kv"].tolist())
    if "mask" in kw:
        args["attn_mask"] = Tensor(kw["mask"])
    weight = Tensor(do)  # float32: MindSpore's CPU build has no bfloat16 arithmetic, only the kernel takes bf16

    def loss(q, k, v):
        return (flash_attention(q, k, v, heads, **args).astype(ms.float32) * weight).sum()

    tq, tk, tv = (Tensor(a).astype(dtype) for a in (q, k, v))
    out = flash_attention(tq, tk, tv, heads, **args)
    assert out.dtype == dtype
    grads = ms.grad(loss, grad_position=(0, 1, 2))(tq, tk, tv)
    return [a.astype(ms.float32).asnumpy().astype(np.float64) for a in (out, *grads)]


MS_CASES = {
    "BNSD_causal_gqa7": ("BNSD", 2, dict(heads=7, kv=1, d=64, sq=70, skv=70)),
    "BNSD_bottom_right": ("BNSD", 3, dict(heads=4, kv=2, d=80, sq=40, skv=90)),
    "BSND_mask": ("BSND", 0, dict(heads=4, kv=4, d=128, sq=33, skv=65, mask_kind="batch")),
    "BSH_plain": ("BSH", 0, dict(heads=4, kv=1, d=24, sq=17, skv=30)),
    "TND_windows": ("TND", 0, dict(heads=4, kv=4, d=80, lengths=[64, 1, 64, 30])),
    "TND_causal": ("TND", 2, dict(heads=4, kv=2, d=64, lengths=[100, 0, 100, 3])),
}


@pytest.mark.parametrize("case", sorted(MS_CASES))
def test_op_values_and_gradients_match_float64(case):
    layout, mode, spec = MS_CASES[case]
    rng = np.random.default_rng(1)
    q, k, v, do, kw = make_case(
        rng,
        layout,
        spec["heads"],
        spec["kv"],
        spec["d"],
        spec.get("sq", 0),
        spec.get("skv", 0),
        lengths=spec.get("lengths"),
        mask_kind=spec.get("mask_kind"),
    )
    assert FlashAttention(spec["heads"], 1.0, layout, mode).backend == "cpu_kernel", explain()
    got = ms_value_and_grads(q, k, v, do, spec["heads"], layout, kw, mode)
    want = oracle(q, k, v, do, spec["heads"], layout, kw.get("cu_q"), kw.get("cu_kv"), kw.get("mask"), mode=mode)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, (want[0], *want[2:])):
        assert_rel_close(g, w, 3e-5, name)


@pytest.mark.parametrize("case", ["BNSD_bottom_right", "BSND_mask", "TND_windows", "TND_causal"])
def test_composed_reference_backend_matches_kernel(case, monkeypatch):
    """The dispatcher's fallback (composed MindSpore) and the kernel agree, values and gradients."""
    layout, mode, spec = MS_CASES[case]
    rng = np.random.default_rng(2)
    q, k, v, do, kw = make_case(
        rng,
        layout,
        spec["heads"],
        spec["kv"],
        spec["d"],
        spec.get("sq", 0),
        spec.get("skv", 0),
        lengths=spec.get("lengths"),
        mask_kind=spec.get("mask_kind"),
    )
    kernel = ms_value_and_grads(q, k, v, do, spec["heads"], layout, kw, mode)
    monkeypatch.setenv("OMNI_FAST_BACKEND", "reference")
    assert FlashAttention(spec["heads"], 1.0, layout, mode).backend == "reference"
    reference = ms_value_and_grads(q, k, v, do, spec["heads"], layout, kw, mode)
    for name, a, b in zip(("out", "dq", "dk", "dv"), kernel, reference):
        assert_rel_close(a, b, 3e-5, name)


def test_bfloat16_inputs_accumulate_in_float32():
    rng = np.random.default_rng(3)
    q, k, v, do, kw = make_case(rng, "TND", 4, 2, 64, 0, 0, lengths=[70, 1, 50])
    # The oracle sees the bf16-rounded inputs, so only the bf16 rounding of the results remains.
    rounded = [Tensor(a).astype(ms.bfloat16).astype(ms.float32).asnumpy() for a in (q, k, v, do)]
    got = ms_value_and_grads(q, k, v, do, 4, "TND", kw, 2, dtype=ms.bfloat16)
    want = oracle(*rounded, 4, "TND", kw["cu_q"], kw["cu_kv"], mode=2)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, (want[0], *want[2:])):
        assert_rel_close(g, w, 1e-2, name)


jit_attention = FlashAttention(4, 0.125, "TND", sparse_mode=2)


def jit_loss(q, k, v, cu, weight):
    return (jit_attention(q, k, v, cu, cu) * weight).sum()


@ms.jit
def jit_value_and_grads(q, k, v, cu, weight):
    return ms.value_and_grad(jit_loss, grad_position=(0, 1, 2))(q, k, v, cu, weight)


def test_under_jit_segment_ends_are_tensors():
    """One compiled graph serves different segment boundaries (same count) and matches PyNative and float64."""
    rng = np.random.default_rng(4)
    for lengths in ([40, 1, 79], [100, 10, 10]):
        q, k, v, do, kw = make_case(rng, "TND", 4, 2, 64, 0, 0, lengths=lengths)
        args = (Tensor(q), Tensor(k), Tensor(v), Tensor(kw["cu_q"]), Tensor(do))
        loss, grads = jit_value_and_grads(*args)
        eager_loss, eager_grads = ms.value_and_grad(jit_loss, grad_position=(0, 1, 2))(*args)
        want = oracle(q, k, v, do, 4, "TND", kw["cu_q"], kw["cu_kv"], scale=0.125, mode=2)
        assert_rel_close(loss.asnumpy(), (want[0] * do).sum(), 1e-5, "loss")
        assert_rel_close(loss.asnumpy(), eager_loss.asnumpy(), 1e-6, "loss vs PyNative")
        for name, g, e, w in zip(("dq", "dk", "dv"), grads, eager_grads, want[2:]):
            assert_rel_close(g.asnumpy(), w, 3e-5, name)
            assert_rel_close(g.asnumpy(), e.asnumpy(), 1e-6, name + " vs PyNative")


def test_text_model_row_segments():
    mask = Tensor(np.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], np.int32))
    ends = padded_row_segments(mask).asnumpy()
    np.testing.assert_array_equal(ends, [2, 5, 5, 5, 8, 10, 10, 15, 15, 20, 20, 20])


# ---------------------------------------------------------------- the face's errors and dispatch


def _t(*shape, dtype=np.float32):
    return Tensor(np.zeros(shape, dtype))


def _qkv():
    return _t(1, 2, 4, 8), _t(1, 2, 4, 8), _t(1, 2, 4, 8)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: flash_attention(*_qkv(), 2, input_layout="SBH"), "SBH"),
        (lambda: flash_attention(*_qkv(), 2, sparse_mode=4), "sparse_mode 4"),
        (lambda: flash_attention(*_qkv(), 3), "query has 2 heads"),
        (lambda: flash_attention(_t(1, 4, 4, 8), _t(1, 3, 4, 8), _t(1, 3, 4, 8), 4), "do not divide"),
        (lambda: flash_attention(_t(1, 2, 4, 8), _t(1, 2, 4, 8), _t(1, 2, 5, 8), 2), "differs from value"),
        (lambda: flash_attention(_t(1, 2, 4, 8), _t(1, 2, 4, 4), _t(1, 2, 4, 4), 2), "head_dim"),
        (lambda: flash_attention(_t(2, 4, 8), _t(2, 4, 8), _t(2, 4, 8), 2, input_layout="BNSD"), "4 dimensions"),
        (lambda: flash_attention(_t(6, 2, 8), _t(6, 2, 8), _t(6, 2, 8), 2, input_layout="TND"), "needs actual_seq"),
        (
            lambda: flash_attention(
                _t(6, 2, 8),
                _t(6, 2, 8),
                _t(6, 2, 8),
                2,
                input_layout="TND",
                actual_seq_qlen=[2, 5],
                actual_seq_kvlen=[2, 6],
            ),
            "ends at 5, but the tensor has 6",
        ),
        (
            lambda: flash_attention(
                _t(6, 2, 8),
                _t(6, 2, 8),
                _t(6, 2, 8),
                2,
                input_layout="TND",
                actual_seq_qlen=[4, 2, 6],
                actual_seq_kvlen=[4, 2, 6],
            ),
            "non-decreasing",
        ),
        (
            lambda: flash_attention(
                _t(6, 2, 8),
                _t(6, 2, 8),
                _t(6, 2, 8),
                2,
                input_layout="TND",
                actual_seq_qlen=[6],
                actual_seq_kvlen=[2, 6],
            ),
            "1 segments, actual_seq_kvlen 2",
        ),
        (
            lambda: flash_attention(*_qkv(), 2, actual_seq_qlen=[4]),
            "TND only",
        ),
        (
            lambda: flash_attention(
                _t(1, 2, 4, 8), _t(1, 2, 4, 8), _t(1, 2, 4, 8), 2, attn_mask=_t(4, 4, dtype=np.bool_), sparse_mode=2
            ),
            "sparse_mode 0 only",
        ),
        (
            lambda: flash_attention(*_qkv(), 2, attn_mask=_t(4, 5, dtype=np.bool_)),
            "attn_mask shape",
        ),
        (lambda: flash_attention(*_qkv(), 2, attn_mask=_t(4, 4)), "bool or uint8"),
        (
            lambda: flash_attention(_t(1, 2, 4, 8), _t(1, 2, 4, 8), _t(1, 2, 4, 8, dtype=np.float16), 2),
            "dtypes differ",
        ),
    ],
)
def test_face_rejects_what_it_cannot_serve(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_dispatch_explains_and_falls_back():
    assert "device is CPU, not Ascend" in explain(ms.float32)
    assert "dtype Float16 is not float32 or bfloat16" in explain(ms.float16)
    assert FlashAttention(2, 1.0, dtype=ms.float16).backend == "reference"
    out = flash_attention(*(Tensor(np.ones((1, 2, 3, 8), np.float16)) for _ in range(3)), 2, sparse_mode=2)
    np.testing.assert_allclose(out.asnumpy(), 1.0)
