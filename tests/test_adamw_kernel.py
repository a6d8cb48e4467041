"""The fused multi-tensor AdamW and gradient sum of squares: C++ fast path vs its scalar reference vs numpy (float32
op for op, bit for bit, and float64), and the MindSpore AdamW / global_grad_norm on the kernel backend vs the
reference composition, in PyNative and under ms.jit."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from conftest import assert_rel_close
from hypothesis import given, settings
from hypothesis import strategies as st
from mindspore import Parameter, Tensor, ops

from omni_fast.ops import GradSquaredSum, grad_squared_sum
from omni_fast.ops.adamw import explain
from omni_fast.ops.library import host_module
from omni_fast.ops.reference import grad_squared_sum_reference
from omni_fast.train.optim import AdamW, global_grad_norm

CHUNK = 32768  # kernels/adamw.h kMultiTensorChunk: sizes around it exercise the split of a tensor into chunks
SIZES = [1, 5, 63, 1000, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 17]
BETA1, BETA2, EPS = 0.9, 0.95, 1e-8


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even (NaN stays NaN)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), ((u >> 16) | 0x40).astype(np.uint16), rounded)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def numpy_adamw(g, w, m, v, decay, h, dtype):
    """One AdamW step on one tensor in ``dtype``, in the reference composition's order (float32: one rounding per
    operation, as MindSpore runs it op by op)."""
    c = {k: dtype(val) for k, val in h.items()}
    g = g.astype(dtype) * c["grad_scale"]
    w = w.astype(dtype)
    if decay:
        w = w * (dtype(1) - c["lr_wd"])
    m = m.astype(dtype) + c["one_minus_beta1"] * (g - m.astype(dtype))
    v = v.astype(dtype) * c["beta2"] + c["one_minus_beta2"] * g * g
    denom = np.sqrt(v) / c["bc2_sqrt"] + c["eps"]
    return w - c["step_size"] * (m / denom), m, v


def hyper(rng) -> dict:
    return {
        "lr_wd": np.float32(rng.uniform(0, 1e-2)),
        "step_size": np.float32(rng.uniform(1e-4, 1e-1)),
        "bc2_sqrt": np.float32(rng.uniform(0.05, 1)),
        "grad_scale": np.float32(rng.choice([1.0, rng.uniform(0.01, 1)])),
    }


def constants(beta1: float = BETA1, beta2: float = BETA2, eps: float = EPS) -> dict:
    # The float32 constants both sides use: (1 - beta) rounded once from double.
    return {"one_minus_beta1": 1.0 - beta1, "beta2": beta2, "one_minus_beta2": 1.0 - beta2, "eps": eps}


# ---------------------------------------------------------------- the C++ kernels on numpy


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.sampled_from(SIZES), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_kernel_fast_and_reference_match_numpy(sizes, seed, data):
    rng = np.random.default_rng(seed)
    n = len(sizes)
    bf16_grad = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    with_low = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    decay = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    h = hyper(rng)
    k = constants()
    grads = [rng.standard_normal(s).astype(np.float32) * np.float32(rng.uniform(1e-3, 10)) for s in sizes]
    grads = [to_bf16_bits(g) if b else g for g, b in zip(grads, bf16_grad)]
    weights = [rng.standard_normal(s).astype(np.float32) for s in sizes]
    if any(with_low):  # bfloat16 parameters: their fp32 masters start at the bf16 values
        weights = [from_bf16_bits(to_bf16_bits(w)) if lo else w for w, lo in zip(weights, with_low)]
    exp_avg = [rng.standard_normal(s).astype(np.float32) * np.float32(0.1) for s in sizes]
    exp_avg_sq = [np.abs(rng.standard_normal(s)).astype(np.float32) * np.float32(0.01) for s in sizes]

    want32, want64 = [], []
    for i in range(n):
        g32 = from_bf16_bits(grads[i]) if bf16_grad[i] else grads[i]
        want32.append(numpy_adamw(g32, weights[i], exp_avg[i], exp_avg_sq[i], decay[i], {**h, **k}, np.float32))
        want64.append(numpy_adamw(g32, weights[i], exp_avg[i], exp_avg_sq[i], decay[i], {**h, **k}, np.float64))

    c = host_module()
    for reference in (True, False):
        w, m, v = ([a.copy() for a in arrays] for arrays in (weights, exp_avg, exp_avg_sq))
        low = [np.zeros(s, np.uint16) if lo else None for s, lo in zip(sizes, with_low)]
        c.adamw_update(grads, w, m, v, low, decay, **{k: float(x) for k, x in h.items()},
                       beta1=BETA1, beta2=BETA2, eps=EPS, reference=reference)  # fmt: skip
        for i in range(n):
            for name, got, exact, close in zip(("w", "m", "v"), (w[i], m[i], v[i]), want32[i], want64[i]):
                np.testing.assert_array_equal(got, exact, err_msg=f"{name}[{i}] reference={reference}")
                assert_rel_close(got, close, 1e-5, f"{name}[{i}] vs float64")
            if with_low[i]:
                np.testing.assert_array_equal(low[i], to_bf16_bits(want32[i][0]), err_msg=f"low[{i}]")


def test_kernel_bf16_rounding_is_nearest_even():
    # Weights exactly halfway between two bf16 values (and NaN): the low copy must round like torch's cast.
    one = np.float32(1.0)
    halfway = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), np.nan], np.float32)
    zeros = np.zeros(4, np.float32)
    w, low = halfway.copy(), np.zeros(4, np.uint16)
    # step_size 0, no decay: the weights stay as they are and only the low copy is written.
    host_module().adamw_update([zeros], [w], [zeros.copy()], [zeros.copy()], [low], [False], lr_wd=0.0, step_size=0.0,
                               bc2_sqrt=one, grad_scale=one, beta1=BETA1, beta2=BETA2, eps=EPS)  # fmt: skip
    np.testing.assert_array_equal(from_bf16_bits(low[:3]), [1.0, 1 + 4 * 2**-8, -1.0])
    assert np.isnan(from_bf16_bits(low[3:])).all()


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.sampled_from([0, *SIZES]), min_size=1, max_size=6), seed=st.integers(0, 2**16))
def test_squared_sum_matches_numpy_and_is_deterministic(sizes, seed):
    rng = np.random.default_rng(seed)
    grads = [rng.standard_normal(s).astype(np.float32) * np.float32(rng.uniform(1e-3, 1e3)) for s in sizes]
    grads = [to_bf16_bits(g) if i % 2 else g for i, g in enumerate(grads)]  # every other one as bfloat16
    values = [(from_bf16_bits(g) if i % 2 else g).astype(np.float64) for i, g in enumerate(grads)]
    want = sum(float((x * x).sum()) for x in values)
    c = host_module()
    fast = c.grad_squared_sum(grads)
    assert fast == pytest.approx(want, rel=1e-12)
    assert c.grad_squared_sum(grads, reference=True) == pytest.approx(want, rel=1e-12)
    assert all(c.grad_squared_sum(grads) == fast for _ in range(3))  # chunk partials added in a fixed order


def test_squared_sum_propagates_non_finite():
    c = host_module()
    big = np.ones(CHUNK + 5, np.float32)
    for bad in (np.nan, np.inf):
        g = big.copy()
        g[-1] = bad
        for reference in (True, False):
            got = c.grad_squared_sum([np.ones(3, np.float32), g], reference)
            assert np.isnan(got) if np.isnan(bad) else got == np.inf


def test_kernel_rejects_bad_inputs():
    c = host_module()
    z = np.zeros((2, 3), np.float32)
    kw = {"lr_wd": 0.0, "step_size": 1e-3, "bc2_sqrt": 1.0, "grad_scale": 1.0, "beta1": BETA1, "beta2": BETA2,
          "eps": EPS}  # fmt: skip

    def update(grads=(z,), weights=None, low=(None,), **over):
        w = [z.copy()] if weights is None else list(weights)
        c.adamw_update(list(grads), w, [z.copy()], [z.copy()], list(low), [True], **{**kw, **over})

    with pytest.raises(ValueError, match="one entry per parameter"):
        update(low=(None, None))
    with pytest.raises(ValueError, match=r"grads\[0\] must be float32 or uint16"):
        update(grads=(z.astype(np.float64),))
    with pytest.raises(ValueError, match=r"weights\[0\] must be float32"):
        update(weights=(z.astype(np.float64),))
    with pytest.raises(ValueError, match=r"weights\[0\] must be C-contiguous"):
        update(weights=(np.zeros((3, 2), np.float32).T,))
    with pytest.raises(ValueError, match=r"weights\[0\] must have the shape of grads\[0\]"):
        update(weights=(np.zeros(6, np.float32),))
    with pytest.raises(ValueError, match=r"low\[0\] must be uint16"):
        update(low=(z.copy(),))
    with pytest.raises(ValueError, match=r"grads\[0\] must be float32 or uint16"):
        c.grad_squared_sum([np.zeros(3, np.int32)])


# ---------------------------------------------------------------- the MindSpore optimizer


SHAPES = [(6, 5), (5,), (3, 4, 2), (CHUNK + 3,), (40, 1700)]


def run_adamw(backend_env, monkeypatch, *, jit: bool, scale: float = 0.7, dtype=ms.float32):
    """Three AdamW steps on SHAPES: (params as float32 numpy, optimizer state, optimizer)."""
    if backend_env:
        monkeypatch.setenv("OMNI_FAST_BACKEND", backend_env)
    else:
        monkeypatch.delenv("OMNI_FAST_BACKEND", raising=False)
    rng = np.random.default_rng(0)
    params = [
        Parameter(Tensor(rng.standard_normal(s).astype(np.float32)).astype(dtype), name=f"p{i}")
        for i, s in enumerate(SHAPES)
    ]
    opt = AdamW(params, beta1=BETA1, beta2=BETA2, eps=EPS, weight_decay=0.1)

    def update(grads, *scalars):
        return opt(grads, *scalars)

    step = ms.jit(update) if jit else update
    for lr in (1e-2, 5e-3, 2e-3):
        grads = tuple(Tensor(rng.standard_normal(s).astype(np.float32)).astype(dtype) for s in SHAPES)
        step(ms.mutable(grads), Tensor(np.float32(scale)), *opt.host_scalars(lr))
    return [p.astype(ms.float32).asnumpy() for p in params], opt.state(), opt


def test_adamw_kernel_equals_reference_bit_for_bit_in_pynative(monkeypatch):
    ours, our_state, opt = run_adamw(None, monkeypatch, jit=False)
    assert opt.backend == "cpu_kernel", explain()
    theirs, their_state, ref = run_adamw("reference", monkeypatch, jit=False)
    assert ref.backend == "reference"
    for i, (a, b) in enumerate(zip(ours, theirs)):
        np.testing.assert_array_equal(a, b, err_msg=f"param {i}")
    assert our_state.keys() == their_state.keys()
    for name in our_state:
        np.testing.assert_array_equal(our_state[name], their_state[name], err_msg=name)


def test_adamw_kernel_under_jit(monkeypatch):
    ours, our_state, opt = run_adamw(None, monkeypatch, jit=True)
    assert opt.backend == "cpu_kernel", explain()
    # The same kernel as in PyNative: bit-equal.
    eager, eager_state, _ = run_adamw(None, monkeypatch, jit=False)
    for i, (a, b) in enumerate(zip(ours, eager)):
        np.testing.assert_array_equal(a, b, err_msg=f"param {i}")
    # The jit'd composition folds its (1 - beta) constants in float32: equal within float32 rounding.
    theirs, their_state, _ = run_adamw("reference", monkeypatch, jit=True)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_rel_close(a, b, 1e-6, f"param {i}")
    for name in our_state:
        assert_rel_close(our_state[name], their_state[name], 1e-5, name)


def test_adamw_kernel_writes_bf16_params_from_fp32_masters(monkeypatch):
    # MindSpore cannot assign bf16 on CPU, so the reference cannot run this; numpy gives the expected values.
    ours, state, opt = run_adamw(None, monkeypatch, jit=False, dtype=ms.bfloat16)
    assert opt.backend == "cpu_kernel", explain((ms.bfloat16,))
    rng = np.random.default_rng(0)
    weights = [from_bf16_bits(to_bf16_bits(rng.standard_normal(s).astype(np.float32))) for s in SHAPES]
    m = [np.zeros(s, np.float32) for s in SHAPES]
    v = [np.zeros(s, np.float32) for s in SHAPES]
    for t, lr in enumerate((1e-2, 5e-3, 2e-3), start=1):
        h = {"lr_wd": np.float32(lr * 0.1), "step_size": np.float32(lr / (1 - BETA1**t)),
             "bc2_sqrt": np.float32(np.sqrt(1 - BETA2**t)), "grad_scale": np.float32(0.7), **constants()}  # fmt: skip
        for i, s in enumerate(SHAPES):
            g = from_bf16_bits(to_bf16_bits(rng.standard_normal(s).astype(np.float32)))
            weights[i], m[i], v[i] = numpy_adamw(g, weights[i], m[i], v[i], len(s) > 1, h, np.float32)
    for i in range(len(SHAPES)):
        np.testing.assert_array_equal(state[f"master.p{i}"], weights[i], err_msg=f"master {i}")
        np.testing.assert_array_equal(state[f"exp_avg.p{i}"], m[i], err_msg=f"exp_avg {i}")
        np.testing.assert_array_equal(ours[i], from_bf16_bits(to_bf16_bits(weights[i])), err_msg=f"param {i}")


def test_adamw_rejects_mismatched_gradients(monkeypatch):
    monkeypatch.delenv("OMNI_FAST_BACKEND", raising=False)
    params = [Parameter(Tensor(np.zeros(s, np.float32)), name=name) for name, s in (("a", (3, 4)), ("b", (5,)))]
    opt = AdamW(params)
    grads = (Tensor(np.zeros((3, 4), np.float32)), Tensor(np.zeros(4, np.float32)))
    with pytest.raises(ValueError, match=r"gradient of shape \(4,\) for parameter b of shape \(5,\)"):
        opt(ms.mutable(grads), Tensor(np.float32(1.0)), *opt.host_scalars(1e-3))
    with pytest.raises(ValueError, match="1 gradients for 2 parameters"):
        opt(ms.mutable(grads[:1]), Tensor(np.float32(1.0)), *opt.host_scalars(1e-3))
    fp16 = (grads[0], Tensor(np.zeros(5, np.float16)))

    @ms.jit
    def update(grads, *scalars):
        return opt(grads, *scalars)

    with pytest.raises(ValueError, match="gradient of b has dtype Float16, not float32 or bfloat16"):
        update(ms.mutable(fp16), Tensor(np.float32(1.0)), *opt.host_scalars(1e-3))


def test_backend_choice_and_explain(monkeypatch):
    monkeypatch.delenv("OMNI_FAST_BACKEND", raising=False)
    fp16 = Parameter(Tensor(np.zeros((2, 2), np.float16)), name="h")
    # float16 has no kernel: the composition serves the whole optimizer, and the dispatcher says why.
    assert AdamW([fp16]).backend == "reference"
    assert "dtype Float16 is not float32 or bfloat16" in explain((ms.float32, ms.float16))
    assert "device is CPU, not Ascend" in explain()
    monkeypatch.setenv("OMNI_FAST_BACKEND", "ascend")
    with pytest.raises(ValueError, match="cannot serve adamw: device is CPU"):
        AdamW([Parameter(Tensor(np.zeros(2, np.float32)), name="x")])


# ---------------------------------------------------------------- the gradient norm


@ms.jit
def jit_grad_norm(grads):
    return global_grad_norm(grads)


@ms.jit
def jit_grad_norm_composed(grads):
    return ops.sqrt(grad_squared_sum_reference(grads))


@pytest.mark.parametrize("dtype", [ms.float32, ms.bfloat16])
def test_grad_norm_fused_matches_composition(dtype):
    rng = np.random.default_rng(3)
    arrays = [rng.standard_normal(s).astype(np.float32) * np.float32(10.0**i) for i, s in enumerate(SHAPES)]
    grads = tuple(Tensor(a).astype(dtype) for a in arrays)
    exact = np.sqrt(sum((g.astype(ms.float32).asnumpy().astype(np.float64) ** 2).sum() for g in grads))
    assert GradSquaredSum((dtype,)).backend == "cpu_kernel", explain((dtype,))
    fused, fused_jit = global_grad_norm(grads), jit_grad_norm(ms.mutable(grads))
    assert fused.shape == () and fused.dtype == ms.float32
    assert float(fused.asnumpy()) == float(fused_jit.asnumpy())
    assert_rel_close(fused.asnumpy(), exact, 1e-7, "fused vs float64")
    for composed in (ops.sqrt(grad_squared_sum_reference(grads)), jit_grad_norm_composed(ms.mutable(grads))):
        assert_rel_close(fused.asnumpy(), composed.asnumpy(), 1e-5, "fused vs composition")


def test_grad_norm_is_non_finite_when_a_gradient_is():
    # The trainer's NaN policy reads this norm.
    for bad in (np.nan, np.inf):
        g = np.ones(CHUNK + 1, np.float32)
        g[7] = bad
        norm = float(global_grad_norm((Tensor(np.ones(3, np.float32)), Tensor(g))).asnumpy())
        assert not np.isfinite(norm)


def test_grad_squared_sum_face(monkeypatch):
    assert float(grad_squared_sum(()).asnumpy()) == 0.0
    monkeypatch.delenv("OMNI_FAST_BACKEND", raising=False)
    assert GradSquaredSum((ms.float32, ms.float16)).backend == "reference"
    monkeypatch.setenv("OMNI_FAST_BACKEND", "reference")
    cell = GradSquaredSum((ms.float32,))
    assert cell.backend == "reference"
    grads = (Tensor(np.full((2, 3), 2.0, np.float32)), Tensor(np.ones(4, np.float32)))
    assert float(cell(grads).asnumpy()) == 28.0
