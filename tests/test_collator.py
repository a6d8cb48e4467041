"""The collator: right padding to a multiple of 8, media concatenated in row order, rope positions per row, and
batches the model takes — mixed images, videos, audios, audio-in-video and text-only rows."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_rel_close
from demo_data import demo_processor, demo_root
from tiny_omni import save_hf_thinker

from omni_fast.data.collator import OmniCollator
from omni_fast.data.template import IGNORE_INDEX, encode_sample
from omni_fast.model import Qwen2_5OmniThinker
from omni_fast.ops.rope_index import get_rope_index_reference


def _sample(prompt: str, answer: str, *, images=(), videos=(), audios=(), av=False):
    m = demo_root() / "media"
    s = encode_sample(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
        [str(m / p) for p in images], [str(m / p) for p in videos], [str(m / p) for p in audios],
        demo_processor(), use_audio_in_video=av,
    )
    s.sample_id = prompt  # what the dataset's DatasetSample carries
    return s


@pytest.fixture(scope="module")
def samples() -> dict:
    return {
        "image": _sample("<image>What shape?", "A red circle.", images=["red_circle.png"]),
        "two_images": _sample("<image><image>Compare.", "Same.", images=["two_shapes.jpg", "blue_triangle.png"]),
        "text": _sample("Say hello.", "Hello!"),
        "audio": _sample("<audio>Hear?", "A low tone.", audios=["low_tone.wav"]),
        "long_audio": _sample("<audio>Falling?", "Yes.", audios=["falling_tone.flac"]),
        "av": _sample("<video><audio>What?", "A square moves.", videos=["square_moves.mp4"],
                      audios=["square_moves.wav"], av=True),
        "video": _sample("<video>What?", "A circle grows.", videos=["circle_grows.mp4"]),
    }


@pytest.fixture(scope="module")
def collator() -> OmniCollator:
    return OmniCollator.from_processor(demo_processor())


@pytest.fixture(scope="module")
def model_dir(hf_tiny, tmp_path_factory) -> Path:
    return save_hf_thinker(hf_tiny, tmp_path_factory.mktemp("tiny_thinker"))


def _rope_row(s, mask_row, ids_row):
    ids = demo_processor().ids
    seqlens = None if s.feature_attention_mask is None else s.feature_attention_mask.sum(-1)
    return get_rope_index_reference(
        ids_row[None], s.image_grid_thw, s.video_grid_thw, mask_row[None], use_audio_in_video=s.use_audio_in_video,
        audio_seqlens=seqlens, second_per_grids=s.video_second_per_grid, image_token_id=ids["image"],
        video_token_id=ids["video"], audio_token_id=ids["audio"], vision_start_token_id=ids["vision_bos"],
        audio_start_token_id=ids["audio_bos"],
    )[0][:, 0]


@pytest.mark.parametrize("names", [("text",), ("image", "text"), ("audio", "long_audio", "image", "two_images"),
                                   ("av", "video", "text", "audio", "image")])
def test_padding_and_concatenation(samples, collator, names):
    rows = [samples[n] for n in names]
    out = collator(rows)
    lengths = [s.input_ids.size for s in rows]
    width = out["input_ids"].shape[1]
    assert width % 8 == 0 and max(lengths) <= width < max(lengths) + 8
    pad = demo_processor().tokenizer.pad_token_id
    for b, (s, n) in enumerate(zip(rows, lengths)):  # right padding, as the reference
        assert np.array_equal(out["input_ids"][b, :n], s.input_ids) and (out["input_ids"][b, n:] == pad).all()
        assert np.array_equal(out["labels"][b, :n], s.labels) and (out["labels"][b, n:] == IGNORE_INDEX).all()
        assert out["attention_mask"][b, :n].all() and not out["attention_mask"][b, n:].any()
        assert np.array_equal(out["position_ids"][:, b], _rope_row(s, out["attention_mask"][b], out["input_ids"][b]))
    for name in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "video_second_per_grid"):
        parts = [getattr(s, name) for s in rows if getattr(s, name) is not None]
        if parts:
            assert np.array_equal(out[name], np.concatenate(parts)), name
        else:
            assert name not in out
    audio_rows = [s for s in rows if s.input_features is not None]
    if audio_rows:
        frames = max(s.input_features.shape[-1] for s in audio_rows)
        assert out["input_features"].shape == (len(audio_rows), 128, frames)
        for i, s in enumerate(audio_rows):
            f = s.input_features.shape[-1]
            assert np.array_equal(out["input_features"][i, :, :f], s.input_features[0])
            assert not out["input_features"][i, :, f:].any() and not out["feature_attention_mask"][i, f:].any()
            assert np.array_equal(out["feature_attention_mask"][i, :f], s.feature_attention_mask[0])
    else:
        assert "input_features" not in out
    assert out["use_audio_in_video"] == ("av" in names)
    assert out["sample_ids"] == [s.sample_id for s in rows]


def test_exact_multiple_is_not_padded_further_and_label_pad_option(samples):
    s = samples["text"]
    n = s.input_ids.size
    cut = dataclasses.replace(s, input_ids=s.input_ids[: n - n % 8], labels=s.labels[: n - n % 8],
                              attention_mask=s.attention_mask[: n - n % 8])
    assert OmniCollator.from_processor(demo_processor())([cut])["input_ids"].shape == (1, n - n % 8)
    pad = demo_processor().tokenizer.pad_token_id
    out = OmniCollator.from_processor(demo_processor(), label_pad_ignored=False)([samples["text"], samples["image"]])
    short = int(np.argmin([samples["text"].input_ids.size, samples["image"].input_ids.size]))
    assert out["labels"][short, -1] == pad
    with pytest.raises(ValueError, match="empty list"):
        OmniCollator.from_processor(demo_processor())([])


def test_uniform_batches_match_the_batched_rope_index(samples, collator):
    ids = demo_processor().ids
    rows = [samples[n] for n in ("av", "audio", "image", "text")]  # one use_audio_in_video for the whole batch
    out = collator(rows)
    seqlens = out["feature_attention_mask"].sum(-1)
    batched, _ = get_rope_index_reference(
        out["input_ids"], out["image_grid_thw"], out["video_grid_thw"], out["attention_mask"], True, seqlens,
        out["video_second_per_grid"], image_token_id=ids["image"], video_token_id=ids["video"],
        audio_token_id=ids["audio"], vision_start_token_id=ids["vision_bos"], audio_start_token_id=ids["audio_bos"],
    )
    assert np.array_equal(out["position_ids"], batched)


def _model_batch(out: dict) -> dict:
    return {k: v for k, v in out.items() if k != "sample_ids"}


def test_the_model_takes_mixed_batches(samples, collator, model_dir):
    model = Qwen2_5OmniThinker.from_pretrained(model_dir)
    # audio-in-video next to a plain video: no single use_audio_in_video fits; the per-row positions do
    out = collator([samples[n] for n in ("av", "video", "text", "audio", "two_images")])
    batch = _model_batch(out)
    prepared = model.prepare_batch(**batch)
    assert np.array_equal(prepared.position_ids, out["position_ids"])
    loss = float(model(**batch).loss.asnumpy())
    assert np.isfinite(loss)
    # text-only and audio-only batches too
    for names in (("text",), ("audio", "long_audio")):
        assert np.isfinite(float(model(**_model_batch(collator([samples[n] for n in names]))).loss.asnumpy()))


def test_collated_batch_gives_transformers_loss(samples, collator, model_dir, hf_tiny):
    out = collator([samples[n] for n in ("av", "audio", "image", "text", "two_images")])
    model = Qwen2_5OmniThinker.from_pretrained(model_dir)
    batch = _model_batch(out)
    ours = float(model(**batch).loss.asnumpy())
    prepared = model.prepare_batch(**{k: v for k, v in batch.items() if k != "position_ids"})
    assert np.array_equal(prepared.position_ids, out["position_ids"])  # the model's own rope index agrees
    theirs_inputs = {}
    for k, v in batch.items():
        if k == "position_ids":
            continue
        if isinstance(v, np.ndarray):
            t = torch.from_numpy(v)
            theirs_inputs[k] = t.float() if v.dtype in (np.float32, np.float64) else t.long()
        else:
            theirs_inputs[k] = v
    theirs_inputs["feature_attention_mask"] = theirs_inputs["feature_attention_mask"].int()
    with torch.no_grad():
        theirs = float(hf_tiny(**theirs_inputs).loss)
    assert_rel_close(ours, theirs, 1e-5, "loss")
