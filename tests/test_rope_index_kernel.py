"""get_rope_index (the compiled kernels/rope_index.h) vs transformers 4.53 and vs the numpy reference: bit-exact.

Valid batches must give identical positions and deltas from all three; malformed ones (drawn by mutating valid
batches) must raise ValueError with exactly the reference's message (row, token column and wording), never crash.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from sequences import Batch, av_tokens, build_batch
from test_rope_index import (
    AUDIO,
    AV,
    IMAGE,
    MALFORMED,
    TEXT,
    TOKEN_KW,
    VIDEO,
    _av_batch,
    _batch,
    _image_row,
    _non_empty,
    _replace,
    hf_rope_index,
    ref_rope_index,
)
from tiny_omni import TINY_IDS

from omni_fast.ops import dispatch, get_rope_index
from omni_fast.ops.library import host_module
from omni_fast.ops.rope_index import backend_reasons


def kernel_rope_index(b: Batch, mask: bool = True, **kw) -> tuple[np.ndarray, np.ndarray]:
    return get_rope_index(
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


def assert_all_same(b: Batch, with_transformers: bool = True) -> tuple[np.ndarray, np.ndarray]:
    pos, delta = kernel_rope_index(b)
    assert pos.dtype == np.int64 and delta.dtype == np.int64
    assert pos.shape == (3, *b.input_ids.shape) and delta.shape == (b.input_ids.shape[0], 1)
    expected = [("reference", ref_rope_index(b))]
    if with_transformers:
        expected.append(("transformers", hf_rope_index(b)))
    for name, (want_pos, want_delta) in expected:
        assert np.array_equal(pos, want_pos), (name, np.argwhere(pos != want_pos)[:5])
        assert np.array_equal(delta, want_delta), (name, delta.ravel(), want_delta.ravel())
    return pos, delta


def test_face_uses_the_compiled_kernel() -> None:
    # otherwise every comparison below would compare the reference with itself
    assert dispatch.choose("rope_index", backend_reasons()) == "cpu_kernel"
    assert hasattr(host_module(), "rope_index")


# ---------------------------------------------------------------------------------------------- strategies


def scatter_padding(b: Batch, seed: int, pads: int) -> Batch:
    """The same rows with ``pads`` masked pad tokens inserted at random places in each (not only at the ends)."""
    rng = np.random.default_rng(seed)
    ids, mask = [], []
    for row_ids, row_mask in zip(b.input_ids, b.attention_mask):
        at = np.sort(rng.integers(0, row_ids.size + 1, size=pads))
        ids.append(np.insert(row_ids, at, TINY_IDS["pad"]))
        mask.append(np.insert(row_mask, at, 0))
    return Batch(**{**b.__dict__, "input_ids": np.stack(ids), "attention_mask": np.stack(mask)})


@st.composite
def batches(draw, multimodal: bool = True, max_rows: int = 8, items=None) -> Batch:
    """Up to ``max_rows`` rows of 1-5 items each, left, right or scattered padding."""
    use_audio_in_video = multimodal and draw(st.booleans())
    if items is None:
        items = (
            st.one_of(TEXT, IMAGE, AV if use_audio_in_video else VIDEO, AUDIO) if multimodal else st.one_of(TEXT, AUDIO)
        )
    rows = draw(st.lists(st.lists(items, min_size=1, max_size=5).map(_non_empty), min_size=1, max_size=max_rows))
    padding = draw(st.sampled_from(["left", "right", "scattered"]))
    seed = draw(st.integers(0, 999))
    b = build_batch(
        rows, padding_side="right" if padding == "scattered" else padding, seed=seed, extra_pad=draw(st.integers(0, 2))
    )
    return scatter_padding(b, seed, draw(st.integers(1, 3))) if padding == "scattered" else b


# ---------------------------------------------------------------------------------------------- parity


@settings(max_examples=250, deadline=None)
@given(batches())
def test_matches_transformers_and_reference(b: Batch) -> None:
    assert_all_same(b)


@settings(max_examples=60, deadline=None)
@given(batches(multimodal=False))
def test_fallback_matches_transformers_and_reference(b: Batch) -> None:
    # text-only and audio-only batches: transformers' cumsum fallback (no grids at all)
    assert b.image_grid_thw is None and b.video_grid_thw is None
    assert_all_same(b)


@settings(max_examples=50, deadline=None)
@given(batches(max_rows=1), st.booleans())
def test_without_mask_and_with_empty_grid_lists(b: Batch, empty_images: bool) -> None:
    # no attention_mask means all ones; an empty grid array (not None) still selects the multimodal path
    attended = b.attention_mask[0] == 1
    b = Batch(**{**b.__dict__, "input_ids": b.input_ids[:, attended], "attention_mask": b.attention_mask[:, attended]})
    if empty_images and b.image_grid_thw is None:
        b = Batch(**{**b.__dict__, "image_grid_thw": np.zeros((0, 3), np.int64)})
    got = kernel_rope_index(b, mask=False)
    wants = [ref_rope_index(b, mask=False)]
    if b.image_grid_thw is not None or b.video_grid_thw is not None:  # transformers' fallback needs a mask
        wants.append(hf_rope_index(b, mask=False))
    for want in wants:
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


# Big items for long rows: a batch of 8 rows over the kernel's threshold for more than one OpenMP thread.
BIG_ITEM = st.one_of(
    st.tuples(st.just("text"), st.integers(0, 400)),
    st.tuples(st.just("image"), st.tuples(st.just(1), st.sampled_from([16, 28, 32]), st.sampled_from([16, 24, 32]))),
    st.tuples(st.just("audio"), st.integers(3, 1500)),
    st.tuples(
        st.just("av"),
        st.tuples(st.integers(1, 8), st.sampled_from([8, 16, 24]), st.sampled_from([8, 24])),
        st.sampled_from([0.5, 1.0, 1 / 3, 1.7, 3.0]),
        st.integers(3, 1200),
    ),
)


@settings(max_examples=3, deadline=None)
@given(st.data())
def test_batches_of_eight_long_rows_use_threads(data: st.DataObject) -> None:
    threshold = host_module().ROPE_INDEX_PARALLEL_MIN_TOKENS
    text = threshold // 8 + 1  # every row alone is long enough for 8 rows to cross the threshold
    rows = []
    for _ in range(8):
        items = data.draw(st.lists(BIG_ITEM, min_size=2, max_size=5))
        split = data.draw(st.integers(0, len(items)))
        rows.append([*items[:split], ("text", text), *items[split:]])
    b = build_batch(rows, data.draw(st.sampled_from(["left", "right"])), seed=data.draw(st.integers(0, 99)))
    assert b.input_ids.size >= threshold
    assert_all_same(b)


@pytest.mark.parametrize("mel_frames", [3, 100, 196, 204, 900])
@pytest.mark.parametrize("seconds", [1.0, 1 / 3, 1.7, 3.0])
def test_audio_in_video_shorter_and_longer(mel_frames: int, seconds: float) -> None:
    # video (4, 4, 4) spans 4 * seconds; the audio mel_frames / 100 s: both shorter and longer than the video
    b = build_batch(
        [[("text", 2), ("av", (4, 4, 4), seconds, mel_frames), ("text", 2)], [("av", (1, 2, 2), seconds, mel_frames)]],
        padding_side="left",
    )
    assert_all_same(b)


FIXED = {
    # transformers_omni.md sec. 6 worked example
    "doc_example": [[("text", 29), ("image", (1, 20, 28)), ("av", (4, 24, 24), 1.0, 400), ("text", 45)]],
    # float32 5 * 0.08 * 25 = 9.99.. -> 9; 2 * 333333.3 * 25 rounds up in float32
    "truncated_t_offsets": [[("video", (6, 2, 2), 0.08)], [("video", (3, 2, 2), 333333.3)]],
    # 75 ids per t slice > 50 per chunk: a t slice split over several chunks
    "chunk_counter_lags": [[("av", (3, 2, 4), 3.0, 700)]],
    # 1000 s per grid: every video token its own chunk, interleaved with the audio chunks
    "one_token_chunks": [[("av", (3, 2, 4), 1000.0, 900), ("text", 2)]],
    # the end tokens start after the last emitted chunk (short audio), below the video's largest w
    "end_after_last_chunk": [[("av", (1, 2, 80), 1.0, 20), ("text", 3)]],
    "zero_seconds": [[("video", (5, 2, 2), 0.0), ("text", 1)]],
    "single_tokens": [[("text", 1)], [("image", (1, 2, 2))], [("video", (1, 2, 2), 2.0)], [("audio", 3)]],
}


@pytest.mark.parametrize("name", sorted(FIXED))
@pytest.mark.parametrize("padding", ["left", "right"])
def test_fixed_cases(name: str, padding: str) -> None:
    assert_all_same(build_batch(FIXED[name], padding, extra_pad=1))


def test_fallback_delta_counts_pad_position() -> None:
    b = build_batch([[("text", 1)], [("text", 4)], [("audio", 50)]], "left")
    _, delta = assert_all_same(b)
    assert delta.ravel().tolist() == [1, 0, 0]


def test_float_rate_and_other_config() -> None:
    # a float position_id_per_seconds takes transformers' float32 image path; merge size 1; other chunk sizes
    b = build_batch([[("image", (3, 4, 4)), ("av", (2, 4, 4), 0.7, 500)]])
    for kw in ({"position_id_per_seconds": 12.5}, {"seconds_per_chunk": 0.3}, {"position_id_per_seconds": 7}):
        got, want = kernel_rope_index(b, **kw), ref_rope_index(b, **kw)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]), kw
    ids = np.array([[5, TINY_IDS["vision_bos"], *[TINY_IDS["image"]] * 6, TINY_IDS["vision_eos"]]])
    one = Batch(ids, np.ones_like(ids), np.array([[1, 2, 3]]), None, None, None, False, [ids.shape[1]])
    for impl in (kernel_rope_index, ref_rope_index):
        pos, _ = impl(one, spatial_merge_size=1)
        assert pos[:, 0, 2:8].tolist() == [[2] * 6, [2, 2, 2, 3, 3, 3], [2, 3, 4, 2, 3, 4]]


# ---------------------------------------------------------------------------------------------- malformed


VBOS, IMG, VID, AUD = (TINY_IDS[k] for k in ("vision_bos", "image", "video", "audio"))


def _av_row(change) -> Batch:
    """One audio-in-video row (grid (1, 2, 2), 300 mel frames: 1 video + 75 audio tokens) with its tokens changed."""
    tokens = change(av_tokens((1, 2, 2), 1.0, 300))
    ids = np.array([[5, *tokens, 6]])
    return Batch(ids, np.ones_like(ids), None, np.array([[1, 2, 2]]), np.array([1.0]), np.array([300]), True, [])


# checks the mutations below rarely reach
MORE_MALFORMED = {
    "starts_inside_previous_block": lambda: _replace(
        _image_row([5, VBOS, IMG, VBOS, IMG, TINY_IDS["vision_eos"]]), image_grid_thw=np.array([[1, 2, 2]] * 2)
    ),
    "av_starts_with_audio": lambda: _av_row(lambda t: t[:2] + [AUD, VID] + t[4:]),
    "av_video_count": lambda: _av_row(lambda t: t[:3] + [VID] + t[4:]),
    "av_end_is_placeholder": lambda: _av_row(lambda t: t[:-2] + [IMG] + t[-1:]),
    "negative_seconds": lambda: _replace(_batch(), second_per_grids=np.array([-1.0])),
    "nan_seconds": lambda: _replace(_av_batch(), second_per_grids=np.array([float("nan")])),
    "t_offset_too_large": lambda: _replace(_batch(), second_per_grids=np.array([1e9])),
    "t_offset_infinite": lambda: _replace(_av_batch(), second_per_grids=np.array([3e38])),
}


@pytest.mark.parametrize("case", sorted(MALFORMED) + sorted(MORE_MALFORMED))
def test_malformed_cases_raise_the_reference_error(case: str) -> None:
    b = MALFORMED[case][0]() if case in MALFORMED else MORE_MALFORMED[case]()
    with pytest.raises(ValueError) as want, np.errstate(over="ignore", invalid="ignore"):  # numpy on inf seconds
        ref_rope_index(b)
    with pytest.raises(ValueError) as got:
        kernel_rope_index(b)
    assert str(got.value) == str(want.value)


SPECIAL = [TINY_IDS[k] for k in ("image", "video", "audio", "vision_bos", "audio_bos", "vision_eos", "audio_eos")]


@st.composite
def mutated(draw) -> Batch:
    """A valid batch with 1-3 random corruptions of its tokens, mask or media lists."""
    b = draw(batches(max_rows=3))
    d = dict(b.__dict__)
    ids, mask = d["input_ids"].copy(), d["attention_mask"].copy()
    for _ in range(draw(st.integers(1, 3))):
        what = draw(
            st.sampled_from(
                [
                    "set_token",
                    "delete_token",
                    "insert_token",
                    "grid",
                    "grid_count",
                    "audio",
                    "audio_count",
                    "seconds",
                    "flag",
                    "mask",
                ]
            )
        )
        r = draw(st.integers(0, ids.shape[0] - 1))
        c = draw(st.integers(0, ids.shape[1] - 1))
        if what == "set_token":
            ids[r, c] = draw(st.sampled_from(SPECIAL + [7]))
        elif what == "delete_token":  # shift the rest of the row left, pad at the end
            ids[r, c:] = np.append(ids[r, c + 1 :], TINY_IDS["pad"])
            mask[r, c:] = np.append(mask[r, c + 1 :], 0)
        elif what == "insert_token":
            ids = np.insert(ids, c, TINY_IDS["pad"], axis=1)
            mask = np.insert(mask, c, 0, axis=1)
            ids[r, c], mask[r, c] = draw(st.sampled_from(SPECIAL)), 1
        elif what in ("grid", "grid_count"):
            key = draw(st.sampled_from(["image_grid_thw", "video_grid_thw"]))
            g = d[key]
            if what == "grid" and g is not None and len(g):
                g = g.copy()
                g[draw(st.integers(0, len(g) - 1)), draw(st.integers(0, 2))] += draw(
                    st.sampled_from([-3, -2, -1, 1, 2])
                )
            elif what == "grid_count":
                g = draw(
                    st.sampled_from(
                        [None, np.zeros((0, 3), np.int64), np.array([[1, 2, 2]])] + ([g[:-1]] if g is not None else [])
                    )
                )
            d[key] = g
        elif what in ("audio", "audio_count"):
            a = d["audio_seqlens"]
            if what == "audio" and a is not None and len(a):
                a = a.copy()
                a[draw(st.integers(0, len(a) - 1))] = draw(st.sampled_from([0, 1, 2, 3, -5, 4])) + (
                    0 if draw(st.booleans()) else a[0]
                )
            else:
                a = draw(
                    st.sampled_from(
                        [None, np.zeros(0, np.int64), np.array([100])] + ([a[:-1]] if a is not None else [])
                    )
                )
            d["audio_seqlens"] = a
        elif what == "seconds":
            s = d["second_per_grids"]
            bad = [-1.0, float("nan"), float("inf"), -0.5, 1e9, 3e38]
            if s is not None and len(s) and draw(st.booleans()):
                s = s.copy()
                s[draw(st.integers(0, len(s) - 1))] = draw(st.sampled_from(bad))
            else:
                s = None if s is None or not len(s) else s[:-1]
            d["second_per_grids"] = s
        elif what == "flag":
            d["use_audio_in_video"] = not d["use_audio_in_video"]
        else:
            mask[r] = draw(st.sampled_from([0, 1])) if draw(st.booleans()) else mask[r]
            mask[r, c] = draw(st.sampled_from([0, 1, 2]))
    d["input_ids"], d["attention_mask"] = ids, mask
    return Batch(**d)


def _outcome(impl, b: Batch):
    try:
        return impl(b)
    except ValueError as err:
        return str(err)


@settings(max_examples=300, deadline=None)
@given(mutated())
def test_mutated_batches_give_the_reference_result_or_error(b: Batch) -> None:
    got, want = _outcome(kernel_rope_index, b), _outcome(ref_rope_index, b)
    # coverage labels (pytest --hypothesis-show-statistics): which check fired, without row / column / numbers
    event(re.sub(r"\d+|\(.*?\)|\[.*?\]", "#", want.split(": ", 1)[-1]) if isinstance(want, str) else "valid")
    if isinstance(want, str):
        assert got == want
    else:
        assert not isinstance(got, str), got
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


ABSURD = {
    # grids whose token count overflows int64, huge / negative audio lengths, extreme ids: errors, never a crash
    "huge_grid": lambda b: {"image_grid_thw": np.array([[2**40, 2**40, 2**40], [1, 2, 2]])},
    "negative_audio": lambda b: {"audio_seqlens": np.array([-(2**62)])},
    "huge_audio": lambda b: {"audio_seqlens": np.array([2**62])},
    "extreme_ids": lambda b: {"input_ids": np.where(b.attention_mask == 1, b.input_ids, np.iinfo(np.int64).min)},
}


@pytest.mark.parametrize("case", sorted(ABSURD))
def test_absurd_values_raise_a_value_error_naming_row_and_token(case: str) -> None:
    b = build_batch(
        [[("text", 2), ("image", (1, 4, 4)), ("audio", 100), ("text", 1)], [("image", (1, 2, 2)), ("text", 2)]],
        "left",
        extra_pad=1,
    )
    b = Batch(**{**b.__dict__, **ABSURD[case](b)})
    got, want = _outcome(kernel_rope_index, b), _outcome(ref_rope_index, b)
    if case == "extreme_ids":  # min int64 pads are just masked tokens: valid
        assert np.array_equal(got[0], want[0])
        return
    assert isinstance(got, str) and isinstance(want, str)
    assert got.split(":")[0] == want.split(":")[0] and got.startswith("row 0, token ")


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"input_ids": np.zeros(5, np.int64)}, "input_ids must be 2-D"),
        ({"input_ids": np.zeros((2, 3), np.float32)}, "input_ids must hold integers"),
        ({"input_ids": np.zeros((0, 3), np.int64)}, "input_ids must be non-empty"),
        ({"attention_mask": np.ones((2, 4), np.int64)}, r"attention_mask shape \(2, 4\) != input_ids shape"),
        ({"attention_mask": np.full((2, 3), 0.5)}, "attention_mask must hold integers"),
        ({"image_grid_thw": np.ones((1, 2), np.int64)}, r"image_grid_thw must have shape \(n, 3\)"),
        ({"video_grid_thw": np.ones((1, 3), np.float64)}, "video_grid_thw must hold integers"),
        ({"audio_seqlens": np.ones(2, np.float32)}, "audio_seqlens must hold integers"),
        ({"spatial_merge_size": 0}, "spatial_merge_size must be >= 1"),
        ({"position_id_per_seconds": 0}, r"position_id_per_seconds must be a number in \(0, 2\*\*31\)"),
        ({"position_id_per_seconds": float("nan")}, "position_id_per_seconds must be a number"),
        ({"seconds_per_chunk": float("inf")}, "seconds_per_chunk must be finite"),
        ({"seconds_per_chunk": 0.01}, "position_id_per_seconds \\* seconds_per_chunk must be >= 1"),
    ],
)
def test_bad_arguments_raise_value_error(kw: dict, match: str) -> None:
    args = {"input_ids": np.zeros((2, 3), np.int64), **kw}
    with pytest.raises(ValueError, match=match):
        get_rope_index(**args)


def test_forced_reference_backend_gives_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    b = build_batch([[("text", 3), ("image", (1, 4, 6)), ("audio", 120)], [("video", (3, 2, 4), 0.5)]], "left")
    got = kernel_rope_index(b)
    monkeypatch.setenv("OMNI_FAST_BACKEND", "reference")
    assert dispatch.choose("rope_index", backend_reasons()) == "reference"
    want = kernel_rope_index(b)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
