"""The fused multimodal scatter: C++ fast path vs its scalar reference vs numpy, and the MindSpore op's values and
gradients vs the three-``masked_scatter`` reference, bit for bit (it is a copy), in PyNative and under ms.jit."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mindspore import Tensor

from omni_fast.ops import multimodal_scatter
from omni_fast.ops.library import host_module
from omni_fast.ops.reference import multimodal_scatter_reference
from omni_fast.ops.scatter import (
    AUDIO_TOKEN_ID,
    IMAGE_TOKEN_ID,
    VIDEO_TOKEN_ID,
    MultimodalScatter,
    check_placeholder_counts,
    explain,
)

MODALITIES = ("audio", "image", "video")  # the reference's order
TOKEN_IDS = {"audio": AUDIO_TOKEN_ID, "image": IMAGE_TOKEN_ID, "video": VIDEO_TOKEN_ID}


def make_case(rng, batch, seq, hidden, counts, ids_dtype=np.int32):
    """Random text ids with each modality's placeholders at random positions; features with matching rows.

    ``counts[name]`` is the number of placeholders, or None for an absent modality (no placeholders, no tensor).
    """
    ids = rng.integers(0, 1000, (batch, seq)).astype(ids_dtype)
    positions = rng.permutation(batch * seq)
    start = 0
    features = {}
    for name in MODALITIES:
        n = counts.get(name)
        if n is None:
            features[name] = None
            continue
        ids.reshape(-1)[positions[start : start + n]] = TOKEN_IDS[name]
        start += n
        features[name] = rng.standard_normal((n, hidden)).astype(np.float32)
    embeds = rng.standard_normal((batch, seq, hidden)).astype(np.float32)
    return embeds, ids, features


def numpy_scatter(embeds, ids, features, token_ids):
    out = embeds.reshape(-1, embeds.shape[-1]).copy()
    for feats, token_id in zip(features, token_ids):
        out[ids.reshape(-1) == token_id] = feats
    return out.reshape(embeds.shape)


# ---------------------------------------------------------------- the C++ kernels on numpy


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(0, 4),
    seq=st.integers(0, 40),
    hidden=st.sampled_from([1, 3, 16, 129]),
    fractions=st.lists(st.floats(0, 0.5), min_size=3, max_size=3),
    n_modalities=st.integers(0, 3),
    bf16=st.booleans(),
    ids64=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kernel_fast_and_reference_match_numpy(batch, seq, hidden, fractions, n_modalities, bf16, ids64, seed):
    rng = np.random.default_rng(seed)
    counts = {name: int(f * batch * seq / 1.5) for name, f in zip(MODALITIES[:n_modalities], fractions)}
    embeds, ids, features = make_case(rng, batch, seq, hidden, counts, np.int64 if ids64 else np.int32)
    feats = [features[name] for name in MODALITIES[:n_modalities]]
    token_ids = [TOKEN_IDS[name] for name in MODALITIES[:n_modalities]]
    if bf16:  # uint16 arrays stand for bfloat16 storage in the sandbox; any bit pattern must be copied as is
        embeds = rng.integers(0, 2**16, embeds.shape).astype(np.uint16)
        feats = [rng.integers(0, 2**16, f.shape).astype(np.uint16) for f in feats]
    d_out = embeds[::-1].copy()
    placeholder = np.isin(ids, token_ids)[..., None]
    want = numpy_scatter(embeds, ids, feats, token_ids)
    c = host_module()
    for reference in (True, False):
        out = c.multimodal_scatter_forward(embeds, ids, feats, token_ids, reference)
        assert out.dtype == embeds.dtype and np.array_equal(out, want)
        d_embeds, d_feats = c.multimodal_scatter_backward(d_out, ids, [len(f) for f in feats], token_ids, reference)
        assert np.array_equal(d_embeds, np.where(placeholder, 0, d_out).astype(d_out.dtype))
        assert len(d_feats) == len(feats)
        for d_feat, token_id in zip(d_feats, token_ids):
            assert np.array_equal(d_feat, d_out[ids == token_id])
        # Writing into given buffers (what the benchmark does) overwrites every element.
        for buffer in (out, d_embeds, *d_feats):
            buffer.fill(7)
        assert np.array_equal(c.multimodal_scatter_forward(embeds, ids, feats, token_ids, reference, out=out), want)
        again = c.multimodal_scatter_backward(
            d_out, ids, [len(f) for f in feats], token_ids, reference, out=(d_embeds, d_feats)
        )
        assert again[0] is d_embeds and np.array_equal(d_embeds, np.where(placeholder, 0, d_out).astype(d_out.dtype))
        for d_feat, token_id in zip(again[1], token_ids):
            assert np.array_equal(d_feat, d_out[ids == token_id])


@pytest.mark.parametrize("reference", [True, False])
def test_kernel_refuses_count_mismatch_before_copying(reference):
    c = host_module()
    embeds, ids, features = make_case(np.random.default_rng(0), 2, 9, 4, {"image": 3, "video": 2})
    token_ids = [IMAGE_TOKEN_ID, VIDEO_TOKEN_ID]
    too_few = [features["image"][:2], features["video"]]
    with pytest.raises(ValueError, match=rf"modality 0 \(token id {IMAGE_TOKEN_ID}\) has 3 placeholders but 2"):
        c.multimodal_scatter_forward(embeds, ids, too_few, token_ids, reference)
    with pytest.raises(ValueError, match=rf"modality 1 \(token id {VIDEO_TOKEN_ID}\) has 2 placeholders but 5"):
        c.multimodal_scatter_backward(embeds, ids, [3, 5], token_ids, reference)


def test_kernel_rejects_bad_inputs():
    c = host_module()
    embeds = np.zeros((2, 3, 4), np.float32)
    ids = np.zeros((2, 3), np.int32)
    with pytest.raises(ValueError, match="features must be \\[rows, 4\\]"):
        c.multimodal_scatter_forward(embeds, ids, [np.zeros((0, 5), np.float32)], [7])
    with pytest.raises(ValueError, match="features must have embeds' dtype"):
        c.multimodal_scatter_forward(embeds, ids, [np.zeros((0, 4), np.uint16)], [7])
    with pytest.raises(ValueError, match="ids must be int32 or int64"):
        c.multimodal_scatter_forward(embeds, ids.astype(np.float32), [], [])
    with pytest.raises(ValueError, match="ids hold 5 tokens but embeds have 6 rows"):
        c.multimodal_scatter_forward(embeds, ids.reshape(-1)[:5], [], [])
    with pytest.raises(ValueError, match="token ids must be distinct"):
        c.multimodal_scatter_backward(embeds, ids, [0, 0], [7, 7])
    with pytest.raises(ValueError, match="embeds must be float32 or uint16"):
        c.multimodal_scatter_forward(embeds.astype(np.float64), ids, [], [])
    with pytest.raises(ValueError, match=r"out does not fit \(dtype, shape, C order\)"):
        c.multimodal_scatter_forward(embeds, ids, [], [], out=np.zeros((2, 3, 5), np.float32))
    with pytest.raises(ValueError, match=r"out\[1\]\[0\] does not fit"):
        c.multimodal_scatter_backward(embeds, ids, [0], [7], out=(embeds.copy(), [np.zeros((1, 4), np.float32)]))
    with pytest.raises(ValueError, match=r"out must be \(d_embeds, \[d_features\]\)"):
        c.multimodal_scatter_backward(embeds, ids, [0], [7], out=(embeds.copy(), []))


# ---------------------------------------------------------------- the MindSpore op vs masked_scatter


def _tensors(features, dtype=ms.float32):
    return tuple(None if features[name] is None else Tensor(features[name]).astype(dtype) for name in MODALITIES)


def _ours(embeds, ids, audio, image, video):
    return multimodal_scatter(embeds, ids, image_embeds=image, video_embeds=video, audio_embeds=audio)


def _reference(embeds, ids, audio, image, video):
    present = [(TOKEN_IDS[n], f) for n, f in zip(MODALITIES, (audio, image, video)) if f is not None]
    return multimodal_scatter_reference(embeds, ids, present)


def _values_and_grads(fn, embeds, ids, features, d_out):
    """out and the cotangents of (embeds, *present features) for the given d_out, through ms.vjp."""
    present = [i for i, f in enumerate(features) if f is not None]

    def call(e, *feats):
        full = list(features)
        for i, f in zip(present, feats):
            full[i] = f
        return fn(e, ids, *full)

    out, pullback = ms.vjp(call, embeds, *(features[i] for i in present))
    grads = pullback(d_out)
    return [out, *(grads if isinstance(grads, tuple) else (grads,))]


def _assert_all_equal(got, want, what):
    assert len(got) == len(want)
    for k, (a, b) in enumerate(zip(got, want)):
        a, b = a.astype(ms.float32).asnumpy(), b.astype(ms.float32).asnumpy()
        assert a.shape == b.shape and np.array_equal(a, b), f"{what}: output {k} differs"


CASES = {
    "image only": (1, 64, 32, {"image": 20}),
    "audio only, several rows": (3, 40, 16, {"audio": 50}),
    "all three interleaved, batch of 4": (4, 96, 48, {"audio": 60, "image": 70, "video": 80}),
    "empty image features, no image placeholders": (2, 30, 8, {"audio": 10, "image": 0, "video": 12}),
    "every token a placeholder": (2, 12, 8, {"audio": 8, "image": 8, "video": 8}),
    "no placeholders at all": (2, 20, 8, {}),
}


@pytest.mark.parametrize("ids_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("case", list(CASES))
def test_op_equals_masked_scatter_values_and_gradients(case, ids_dtype):
    batch, seq, hidden, counts = CASES[case]
    rng = np.random.default_rng(len(case))
    embeds, ids, features = make_case(rng, batch, seq, hidden, counts, ids_dtype)
    d_out = Tensor(rng.standard_normal(embeds.shape).astype(np.float32))
    args = (Tensor(embeds), Tensor(ids), _tensors(features), d_out)
    assert MultimodalScatter().backend == "cpu_kernel", explain()
    _assert_all_equal(_values_and_grads(_ours, *args), _values_and_grads(_reference, *args), case)


@settings(max_examples=15, deadline=None)
@given(
    batch=st.integers(1, 4),
    seq=st.integers(1, 48),
    hidden=st.integers(1, 40),
    counts=st.lists(st.one_of(st.none(), st.integers(0, 20)), min_size=3, max_size=3),
    ids64=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_op_equals_masked_scatter_on_random_shapes(batch, seq, hidden, counts, ids64, seed):
    rng = np.random.default_rng(seed)
    # None = an absent modality, 0 = empty [0, H] features; the counts are cut to fit in the tokens.
    room, sizes = batch * seq, {}
    for name, n in zip(MODALITIES, counts):
        sizes[name] = None if n is None else min(n, room)
        room -= sizes[name] or 0
    embeds, ids, features = make_case(rng, batch, seq, hidden, sizes, np.int64 if ids64 else np.int32)
    d_out = Tensor(rng.standard_normal(embeds.shape).astype(np.float32))
    args = (Tensor(embeds), Tensor(ids), _tensors(features), d_out)
    _assert_all_equal(_values_and_grads(_ours, *args), _values_and_grads(_reference, *args), str(sizes))


def test_bfloat16_storage_equals_the_float32_reference():
    # MindSpore's CPU masked_scatter has no bf16 kernel: the oracle runs on the same values in float32; a copy of
    # bf16 values through float32 and back is exact, so equality must still hold bit for bit.
    rng = np.random.default_rng(3)
    embeds, ids, features = make_case(rng, 3, 50, 24, {"audio": 20, "image": 30, "video": 25})
    d_out = rng.standard_normal(embeds.shape).astype(np.float32)
    embeds16, d_out16 = Tensor(embeds).astype(ms.bfloat16), Tensor(d_out).astype(ms.bfloat16)
    feats16 = _tensors(features, ms.bfloat16)
    ours = _values_and_grads(_ours, embeds16, Tensor(ids), feats16, d_out16)
    assert all(t.dtype == ms.bfloat16 for t in ours)
    feats32 = tuple(f.astype(ms.float32) for f in feats16)
    want = _values_and_grads(_reference, embeds16.astype(ms.float32), Tensor(ids), feats32, d_out16.astype(ms.float32))
    _assert_all_equal(ours, want, "bf16")


@ms.jit
def _jit_all(embeds, ids, audio, image, video, d_out):
    out, pullback = ms.vjp(_ours, embeds, ids, audio, image, video)
    d_embeds, _, d_audio, d_image, d_video = pullback(d_out)  # the ids get a zero cotangent
    return out, d_embeds, d_audio, d_image, d_video


@ms.jit
def _jit_image_only(embeds, ids, image):
    return multimodal_scatter(embeds, ids, image_embeds=image)


def test_under_jit_values_and_gradients_equal_the_reference():
    rng = np.random.default_rng(4)
    embeds, ids, features = make_case(rng, 3, 64, 16, {"audio": 30, "image": 40, "video": 20})
    d_out = Tensor(rng.standard_normal(embeds.shape).astype(np.float32))
    feats = _tensors(features)
    got = _jit_all(Tensor(embeds), Tensor(ids), *feats, d_out)
    _assert_all_equal(list(got), _values_and_grads(_reference, Tensor(embeds), Tensor(ids), feats, d_out), "jit")
    # Absent modalities (None) under jit: an empty tensor goes to the kernel in their place.
    embeds, ids, features = make_case(rng, 2, 40, 16, {"image": 25})
    got = _jit_image_only(Tensor(embeds), Tensor(ids), Tensor(features["image"]))
    want = _reference(Tensor(embeds), Tensor(ids), None, Tensor(features["image"]), None)
    _assert_all_equal([got], [want], "jit, image only")


def test_under_jit_a_count_mismatch_fails_the_kernel():
    # Under ms.jit the ids have no values while the graph compiles: the kernel counts and refuses to launch.
    embeds, ids, features = make_case(np.random.default_rng(5), 2, 20, 8, {"image": 6})
    with pytest.raises(RuntimeError, match="MultimodalScatterForward"):
        _jit_image_only(Tensor(embeds), Tensor(ids), Tensor(features["image"][:5])).asnumpy()


# ---------------------------------------------------------------- validation and dispatch


def test_count_mismatches_raise_value_error_naming_modality_and_counts():
    embeds, ids, features = make_case(np.random.default_rng(6), 2, 30, 8, {"audio": 4, "image": 7})
    e, i = Tensor(embeds), Tensor(ids)
    audio, image = Tensor(features["audio"]), Tensor(features["image"])
    with pytest.raises(ValueError, match=r"image: input_ids hold 7 placeholder tokens .* the image features have 6"):
        multimodal_scatter(e, i, audio_embeds=audio, image_embeds=Tensor(features["image"][:6]))
    with pytest.raises(ValueError, match=r"audio: input_ids hold 4 placeholder tokens .* no audio features"):
        multimodal_scatter(e, i, image_embeds=image)
    with pytest.raises(ValueError, match=r"video: input_ids hold 0 placeholder tokens .* video features have 2"):
        multimodal_scatter(e, i, audio_embeds=audio, image_embeds=image, video_embeds=Tensor(features["image"][:2]))
    # The host-side check on numpy (what the thinker's prepare_batch runs), with per-row counts.
    check_placeholder_counts(ids, audio_rows=4, image_rows=7)
    with pytest.raises(ValueError, match=r"image: input_ids hold 7 placeholder tokens \(id 151655; per row \[\d+, \d+"):
        check_placeholder_counts(ids, audio_rows=4, image_rows=8)
    with pytest.raises(ValueError, match=r"audio: input_ids hold 1 placeholder tokens \(id 5; per row \[0, 1\]"):
        check_placeholder_counts(np.array([[1, 2], [3, 5]]), audio_token_id=5)


def test_face_validates_shapes_dtypes_and_ids():
    e = Tensor(np.zeros((2, 3, 8), np.float32))
    ids = Tensor(np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError, match=r"image_embeds shape \(0, 7\) is not \[rows, 8\]"):
        multimodal_scatter(e, ids, image_embeds=Tensor(np.zeros((0, 7), np.float32)))
    with pytest.raises(ValueError, match=r"audio_embeds shape \(2, 1, 8\) is not \[rows, 8\]"):
        multimodal_scatter(e, ids, audio_embeds=Tensor(np.zeros((2, 1, 8), np.float32)))
    with pytest.raises(ValueError, match="video_embeds dtype Float16 differs from inputs_embeds dtype Float32"):
        multimodal_scatter(e, ids, video_embeds=Tensor(np.zeros((0, 8), np.float16)))
    with pytest.raises(ValueError, match="input_ids dtype Float32 is not int32 or int64"):
        multimodal_scatter(e, Tensor(np.zeros((2, 3), np.float32)))
    with pytest.raises(ValueError, match=r"input_ids shape \(3, 2\) must be inputs_embeds shape"):
        multimodal_scatter(e, Tensor(np.zeros((3, 2), np.int32)))
    with pytest.raises(ValueError, match="placeholder ids must be distinct"):
        multimodal_scatter(e, ids, image_token_id=5, video_token_id=5)


def test_dispatch_explains_and_can_be_forced(monkeypatch):
    assert MultimodalScatter(ms.bfloat16).backend == "cpu_kernel"
    # float16 has no kernel: the reference serves it, and the dispatcher says why.
    assert MultimodalScatter(ms.float16).backend == "reference"
    assert "dtype Float16 is not float32 or bfloat16" in explain(ms.float16)
    assert "on Ascend the reference composition serves" in explain()
    monkeypatch.setenv("OMNI_FAST_BACKEND", "reference")
    op = MultimodalScatter()
    assert op.backend == "reference"
    embeds, ids, features = make_case(np.random.default_rng(7), 2, 16, 4, {"image": 5, "video": 0})
    got = op(Tensor(embeds), Tensor(ids), Tensor(features["image"]), Tensor(features["video"]))
    assert np.array_equal(got.asnumpy(), numpy_scatter(embeds, ids, [features["image"]], [IMAGE_TOKEN_ID]))
