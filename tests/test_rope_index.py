"""get_rope_index_reference vs transformers 4.53 get_rope_index: bit-exact on processor-shaped batches."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from sequences import Batch, audio_token_count, av_tokens, build_batch
from tiny_omni import TINY_IDS
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
    Qwen2_5OmniPreTrainedModelForConditionalGeneration as HFOmni,
)

from omni_fast.ops.rope_index import _chunk_ids, get_rope_index_reference

TOKEN_KW = {
    "image_token_id": TINY_IDS["image"],
    "video_token_id": TINY_IDS["video"],
    "audio_token_id": TINY_IDS["audio"],
    "vision_start_token_id": TINY_IDS["vision_bos"],
    "audio_start_token_id": TINY_IDS["audio_bos"],
}


def hf_self(spatial_merge_size: int = 2, position_id_per_seconds=25, seconds_per_chunk=2) -> types.SimpleNamespace:
    """Just what get_rope_index reads from ``self``: spatial_merge_size, six config fields and two helpers."""
    config = types.SimpleNamespace(
        **TOKEN_KW, position_id_per_seconds=position_id_per_seconds, seconds_per_chunk=seconds_per_chunk
    )
    obj = types.SimpleNamespace(config=config, spatial_merge_size=spatial_merge_size)
    obj.get_llm_pos_ids_for_vision = types.MethodType(HFOmni.get_llm_pos_ids_for_vision, obj)
    obj.get_chunked_index = types.MethodType(HFOmni.get_chunked_index, obj)
    return obj


def _t(x, dtype=torch.long):
    return None if x is None else torch.tensor(np.asarray(x), dtype=dtype)


def hf_rope_index(b: Batch, mask=True, spatial_merge_size: int = 2) -> tuple[np.ndarray, np.ndarray]:
    pos, deltas = HFOmni.get_rope_index(
        hf_self(spatial_merge_size),
        torch.from_numpy(b.input_ids),
        _t(b.image_grid_thw),
        _t(b.video_grid_thw),
        torch.from_numpy(b.attention_mask) if mask else None,
        b.use_audio_in_video,
        _t(b.audio_seqlens),
        _t(b.second_per_grids, torch.float32),  # what the processor returns (python floats -> float32 tensor)
    )
    return pos.numpy(), deltas.numpy()


def ref_rope_index(b: Batch, mask=True, **kw) -> tuple[np.ndarray, np.ndarray]:
    return get_rope_index_reference(
        b.input_ids,
        b.image_grid_thw,
        b.video_grid_thw,
        b.attention_mask if mask else None,
        b.use_audio_in_video,
        b.audio_seqlens,
        b.second_per_grids,
        **TOKEN_KW,
        **kw,
    )


def assert_same(b: Batch) -> tuple[np.ndarray, np.ndarray]:
    ref_pos, ref_delta = ref_rope_index(b)
    hf_pos, hf_delta = hf_rope_index(b)
    assert ref_pos.dtype == np.int64 and ref_delta.dtype == np.int64
    assert ref_pos.shape == (3, *b.input_ids.shape) and ref_delta.shape == (b.input_ids.shape[0], 1)
    assert np.array_equal(ref_pos, hf_pos), np.argwhere(ref_pos != hf_pos)[:5]
    assert np.array_equal(ref_delta, hf_delta), (ref_delta.ravel(), hf_delta.ravel())
    return ref_pos, ref_delta


# ---------------------------------------------------------------------------------------------- strategies

EVEN = st.sampled_from([2, 4, 6])
# processor values (temporal_patch_size / fps) and awkward fractions; > 2 s makes the t step exceed a chunk
SECONDS = st.one_of(
    st.sampled_from([0.5, 1 / 3, 2 / 3.0, 1.0, 1.7, 2.0, 3.0, 0.08, 0.04]),
    st.floats(0.02, 3.5, allow_nan=False, allow_infinity=False),
)
TEXT = st.tuples(st.just("text"), st.integers(0, 6))
IMAGE = st.tuples(st.just("image"), st.tuples(st.sampled_from([1, 1, 1, 2]), EVEN, EVEN))
VIDEO = st.tuples(st.just("video"), st.tuples(st.integers(1, 6), EVEN, EVEN), SECONDS)
AUDIO = st.tuples(st.just("audio"), st.integers(3, 400))
# mel frames up to 700 (175 tokens, 7 s) vs video up to 6 * 3.5 s: audio both shorter and longer than the video
AV = st.tuples(st.just("av"), st.tuples(st.integers(1, 6), EVEN, EVEN), SECONDS, st.integers(3, 700))


def _non_empty(row: list[tuple]) -> list[tuple]:
    # an all-padding row is an error in the multimodal path (transformers crashes on it)
    return row if any(item[0] != "text" or item[1] > 0 for item in row) else [("text", 1)]


@st.composite
def batches(draw, multimodal: bool = True) -> Batch:
    use_audio_in_video = multimodal and draw(st.booleans())
    if multimodal:
        item = st.one_of(TEXT, IMAGE, AV if use_audio_in_video else VIDEO, AUDIO)
    else:
        item = st.one_of(TEXT, AUDIO)
    rows = draw(st.lists(st.lists(item, min_size=1, max_size=5).map(_non_empty), min_size=1, max_size=4))
    return build_batch(
        rows,
        padding_side=draw(st.sampled_from(["left", "right"])),
        seed=draw(st.integers(0, 999)),
        extra_pad=draw(st.integers(0, 2)),
    )


# ---------------------------------------------------------------------------------------------- parity


def _events(b: Batch) -> None:
    """Coverage labels shown by ``pytest --hypothesis-show-statistics``."""
    event("use_audio_in_video" if b.use_audio_in_video else "plain videos")
    event("padded" if (b.attention_mask == 0).any() else "no padding")
    if b.video_grid_thw is not None:
        event("fractional second_per_grid" if (b.second_per_grids % 1 != 0).any() else "integral second_per_grid")
    if b.use_audio_in_video:
        video_s = b.video_grid_thw[:, 0] * b.second_per_grids
        audio_s = np.array([audio_token_count(m) / 25 for m in b.audio_seqlens[-len(video_s) :]])
        # the last len(videos) audios are not necessarily the AV ones; a label, not an assertion
        event("some AV audio longer than video" if (audio_s > video_s).any() else "AV audio not longer")
        event("some AV audio shorter than video" if (audio_s < video_s).any() else "AV audio not shorter")


@settings(max_examples=1500, deadline=None)
@given(batches())
def test_matches_transformers(b: Batch) -> None:
    _events(b)
    assert_same(b)


@settings(max_examples=300, deadline=None)
@given(batches(multimodal=False))
def test_fallback_matches_transformers(b: Batch) -> None:
    # text-only and audio-only batches take transformers' cumsum fallback (no grids at all)
    assert b.image_grid_thw is None and b.video_grid_thw is None
    assert_same(b)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 400), min_size=1, max_size=60), st.sampled_from([1, 7, 50]))
def test_chunk_ids_match_get_chunked_index(steps: list[int], per_chunk: int) -> None:
    values = np.cumsum(np.array(steps, dtype=np.int64)) - steps[0]  # non-decreasing, starting at 0
    bounds = HFOmni.get_chunked_index(None, torch.from_numpy(values), per_chunk, 0)
    expected = np.concatenate([np.full(e - s, j) for j, (s, e) in enumerate(bounds)])
    assert np.array_equal(_chunk_ids(values, per_chunk), expected)


@pytest.mark.parametrize("mel_frames", [3, 100, 196, 200, 204, 400, 900])  # 1 .. 225 audio tokens
@pytest.mark.parametrize("seconds", [1.0, 1 / 3, 1.7, 3.0])
def test_audio_in_video_shorter_and_longer(mel_frames: int, seconds: float) -> None:
    # video (4, 4, 4): 16 tokens spanning 4 * seconds; audio n tokens spanning n / 25 s
    b = build_batch(
        [[("text", 2), ("av", (4, 4, 4), seconds, mel_frames), ("text", 2)], [("av", (1, 2, 2), seconds, mel_frames)]],
        padding_side="left",
    )
    assert_same(b)


def test_left_and_right_padding_agree_on_tokens() -> None:
    rows = [[("text", 3), ("image", (1, 4, 6)), ("audio", 120)], [("text", 1)], [("video", (3, 2, 4), 0.5)]]
    left, right = build_batch(rows, "left", extra_pad=1), build_batch(rows, "right", extra_pad=1)
    lp, ld = assert_same(left)
    rp, rd = assert_same(right)
    assert np.array_equal(ld, rd)
    for r in range(3):
        assert np.array_equal(lp[:, r, left.attention_mask[r] == 1], rp[:, r, right.attention_mask[r] == 1])
        assert (lp[:, r, left.attention_mask[r] == 0] == 1).all()


# ---------------------------------------------------------------------------------------------- fixtures


def test_worked_example_from_reference_doc() -> None:
    # transformers_omni.md sec. 6: image 20x28, video (4, 24, 24) at 1 s per grid with 4 s audio (400 mel frames)
    b = build_batch([[("text", 29), ("image", (1, 20, 28)), ("av", (4, 24, 24), 1.0, 400), ("text", 45)]])
    pos, delta = assert_same(b)
    p = pos[:, 0]
    assert b.input_ids.shape[1] == 896 and delta.tolist() == [[191 + 1 - 896]]
    assert (p[:, :29] == np.arange(29)).all() and (p[:, 29] == 29).all()  # text, vision_bos
    img = p[:, 30:170]
    assert (img[0] == 30).all() and img[1].min() == 30 and img[1].max() == 39 and img[2].max() == 43
    assert (p[:, 170] == 44).all() and (p[:, 171:173] == 45).all()  # vision_eos; vision_bos + audio_bos
    assert set(p[0, 173:461].tolist()) == {46, 71}  # video chunk 0: t slices 0 and 1
    assert (p[:, 461:511] == np.arange(46, 96)).all()  # audio chunk 0
    assert set(p[0, 511:799].tolist()) == {96, 121}  # video chunk 1
    assert (p[:, 799:849] == np.arange(96, 146)).all()  # audio chunk 1
    assert (p[:, 849:851] == 146).all() and (p[:, 851:] == np.arange(147, 192)).all()


def test_transformers_video_with_audio_fixture() -> None:
    # transformers' test_get_rope_index_video_with_audio (newer releases): merge size 1, grid (3, 2, 2), 300 frames
    ids = [100, 101] + av_tokens((3, 2, 2), 1.0, 300, merge_size=1) + [102, 103]
    b = Batch(
        np.array([ids]),
        np.ones((1, len(ids)), np.int64),
        None,
        np.array([[3, 2, 2]]),
        np.array([1.0]),
        np.array([300]),
        True,
        [len(ids)],
    )
    b.image_grid_thw = np.zeros((0, 3), np.int64)
    text, bos, eos = [0, 1], [2, 2], [78, 78]
    t_axis = text + bos + [3] * 4 + [28] * 4 + list(range(3, 53)) + [53] * 4 + list(range(53, 78)) + eos + [79, 80]
    h_axis = text + bos + [3, 3, 4, 4] * 2 + list(range(3, 53)) + [3, 3, 4, 4] + list(range(53, 78)) + eos + [79, 80]
    w_axis = text + bos + [3, 4, 3, 4] * 2 + list(range(3, 53)) + [3, 4, 3, 4] + list(range(53, 78)) + eos + [79, 80]
    expected = np.array([[t_axis], [h_axis], [w_axis]])
    for mask in (True, False):
        ref_pos, ref_delta = ref_rope_index(b, mask=mask, spatial_merge_size=1)
        hf_pos, hf_delta = hf_rope_index(b, mask=mask, spatial_merge_size=1)
        assert np.array_equal(ref_pos, expected) and np.array_equal(hf_pos, expected)
        assert np.array_equal(ref_delta, hf_delta) and ref_delta.tolist() == [[81 - len(ids)]]


def test_video_t_offsets_are_truncated_float32_products() -> None:
    # 0.08 s per grid (fps 25): float32 5 * 0.08 * 25 = 9.9999..., truncated to 9 (float64 would give 10)
    b = build_batch([[("video", (6, 2, 2), 0.08)]])
    pos, _ = assert_same(b)
    assert pos[0, 0, 1:7].tolist() == [1 + t for t in (0, 2, 4, 6, 8, 9)]
    # beyond 2^23 float32 steps are >= 1: 2 * 333333.3 s * 25 is 16666665 in float64 but 16666666 in float32
    b = build_batch([[("video", (3, 2, 2), 333333.3)]])
    pos, _ = assert_same(b)
    assert pos[0, 0, 3] - 1 == 16666666


def test_chunk_counter_lags_behind_big_t_steps() -> None:
    # 3 s per grid = 75 ids per t slice > 50 per chunk: transformers opens at most one chunk per token, so the
    # t=150 slice (2 tokens) is split into chunks 2 and 3, with the audio's chunk 2 in between
    b = build_batch([[("av", (3, 2, 4), 3.0, 700)]], seconds_per_chunk=2.0)
    pos, _ = assert_same(b)
    t_row = pos[0, 0].tolist()
    assert t_row[:2] == [0, 0] and t_row[-2:] == [176, 176]  # both bos, both eos (after the last audio chunk)
    assert t_row[2:4] == [1, 1] and t_row[4:54] == list(range(1, 51))  # video chunk 0 (t=0), audio chunk 0
    assert t_row[54:56] == [76, 76] and t_row[56:106] == list(range(51, 101))  # t=75, audio chunk 1
    assert t_row[106:107] == [151] and t_row[107:157] == list(range(101, 151))  # half of t=150, audio chunk 2
    assert t_row[157:158] == [151] and t_row[158:183] == list(range(151, 176))  # other half, audio chunk 3


def test_end_tokens_start_after_last_chunk_not_block_max() -> None:
    # wide video (w/2 = 40) with short audio: last appended chunk is the audio, whose max is below the video's w
    b = build_batch([[("av", (1, 2, 80), 1.0, 20), ("text", 3)]])
    pos, delta = assert_same(b)
    assert pos[2, 0].max() == 1 + 39 and pos[0, 0, -5] == 1 + 4 + 1  # w max 40, audio eos at 6
    assert delta[0, 0] == 40 + 1 - b.input_ids.shape[1]


def test_fallback_delta_counts_pad_position() -> None:
    # transformers takes the max over pads too (position 1), so a 1-token padded row gets delta 1, not 0
    b = build_batch([[("text", 1)], [("text", 4)], [("audio", 50)]], "left")
    _, delta = assert_same(b)
    assert delta.ravel().tolist() == [1, 0, 0]


# ---------------------------------------------------------------------------------------------- malformed


def _batch() -> Batch:
    return build_batch(
        [
            [("text", 2), ("image", (1, 4, 4)), ("audio", 100), ("text", 1)],
            [("video", (2, 2, 2), 0.5), ("image", (1, 2, 2)), ("text", 2)],
        ],
        "left",
        extra_pad=1,
    )


def _av_batch() -> Batch:
    return build_batch([[("text", 2), ("av", (2, 2, 2), 1.0, 300), ("text", 1)]])


def _replace(b: Batch, **kw) -> Batch:
    return Batch(**{**b.__dict__, **kw})


def _image_row(tokens: list[int]) -> Batch:
    """One left-padded row (1 pad) holding ``tokens``, with one (1, 2, 2) image grid and nothing else."""
    ids = np.array([[TINY_IDS["pad"], *tokens]], np.int64)
    mask = np.ones_like(ids)
    mask[0, 0] = 0
    return Batch(ids, mask, np.array([[1, 2, 2]]), None, None, None, False, [len(tokens)])


VBOS, IMG = TINY_IDS["vision_bos"], TINY_IDS["image"]
MALFORMED = {
    "vision_bos_last": (
        lambda: _image_row([5, VBOS, IMG, TINY_IDS["vision_eos"], 7, VBOS]),
        r"row 0, token 6: <\|vision_bos\|> is the last token",
    ),
    "more_images_than_grids": (
        lambda: _replace(_batch(), image_grid_thw=_batch().image_grid_thw[:1]),
        r"row 1, token \d+: image #1 of the batch has no image_grid_thw row",
    ),
    "more_audios_than_lengths": (
        lambda: _replace(_batch(), audio_seqlens=np.zeros(0, np.int64)),
        r"row 0, token \d+: audio #0 of the batch has no audio_seqlens entry",
    ),
    "audio_length_mismatch": (
        lambda: _replace(_batch(), audio_seqlens=np.array([108])),
        r"row 0, token \d+: audio needs 27 <\|AUDIO\|> tokens \(108 mel frames\), found 25",
    ),
    "image_grid_mismatch": (
        lambda: _replace(_batch(), image_grid_thw=np.array([[1, 4, 4], [1, 2, 4]])),
        r"row 1, token \d+: image needs 2 <\|IMAGE\|> tokens",
    ),
    "video_without_seconds": (
        lambda: _replace(_batch(), second_per_grids=None),
        r"row 1, token \d+: video #0 of the batch has no second_per_grids",
    ),
    "odd_grid": (
        lambda: _replace(_batch(), image_grid_thw=np.array([[1, 4, 4], [1, 1, 4]])),
        r"row 1, token \d+: image_grid_thw\[1\] = \(1, 1, 4\) must be positive with h and w divisible",
    ),
    "unused_grids": (
        lambda: _replace(_batch(), image_grid_thw=np.array([[1, 4, 4], [1, 2, 2], [1, 2, 2]])),
        r"image_grid_thw has 3 entries but the batch has only 2",
    ),
    "too_few_mel_frames": (lambda: _replace(_batch(), audio_seqlens=np.array([2])), r"2 mel frames give no audio"),
    "av_length_mismatch": (
        lambda: _replace(_av_batch(), audio_seqlens=np.array([200])),
        r"row 0, token 2: audio-in-video block needs 2 <\|VIDEO\|> \+ 50 <\|AUDIO\|> tokens",
    ),
    "av_without_flag": (
        lambda: _replace(_av_batch(), use_audio_in_video=False),
        r"row 0, token 2: .*needs use_audio_in_video=True",
    ),
    "plain_video_with_flag": (
        lambda: _replace(_batch(), use_audio_in_video=True),
        r"row 1, token \d+: a video without interleaved audio",
    ),
    "stray_placeholder": (
        lambda: _image_row([5, IMG, 6, VBOS, IMG, TINY_IDS["vision_eos"]]),
        r"row 0, token 2: placeholder token 1012 outside any",
    ),
    "missing_end_token": (
        lambda: _image_row([5, VBOS, IMG]),
        r"row 0, token 2: image block is cut off",
    ),
    "all_padding_row": (
        lambda: _replace(_batch(), attention_mask=_batch().attention_mask * np.array([[1], [0]])),
        r"row 1 has no attended tokens",
    ),
    "non_binary_mask": (
        lambda: _replace(_batch(), attention_mask=_batch().attention_mask * 2),
        r"attention_mask must hold only 0 and 1",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_input_raises_value_error(case: str) -> None:
    make, match = MALFORMED[case]
    with pytest.raises(ValueError, match=match):
        ref_rope_index(make())


def test_audio_mismatch_is_caught_on_the_fallback_path_too() -> None:
    b = build_batch([[("text", 2), ("audio", 100)]])
    with pytest.raises(ValueError, match=r"row 0, token 2: audio needs"):
        ref_rope_index(_replace(b, audio_seqlens=np.array([300])))
