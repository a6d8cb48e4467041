"""omni_fast.data processor + qwen2_omni template against transformers 4.53's real Qwen2.5-Omni processor.

The reference is ``Qwen2_5OmniProcessor`` built on the tiny tokenizer of omni_fast.data.tiny_tokenizer, with the
real ``Qwen2VLImageProcessor``, ``WhisperFeatureExtractor``, chat template, ``apply_chat_template``, ``__call__`` and
``replace_multimodal_special_tokens``. Only its video processor is stood in for: ``Qwen2VLVideoProcessor`` needs
torchvision (not installable here), so :class:`TorchVideoProcessor` re-does its ``_preprocess`` in torch with the
call torchvision makes on CPU for uint8 bicubic (``F.interpolate(..., antialias=True)`` on uint8, the native kernel)
and torchvision's ``normalize`` (sub, then div) on the fused mean/std. The processor's class check cannot accept
it (transformers hands out a fresh placeholder class per attribute access without torchvision), so the check is
patched out while constructing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from PIL import Image
from test_media import DEMO, write_video
from tiny_omni import TINY_IDS

from omni_fast.data import IGNORE_INDEX, MediaError, OmniProcessor, encode_sample, load_audio, load_video
from omni_fast.data.processor import audio_token_count, chunk_counts, regularize_image
from omni_fast.data.tiny_tokenizer import HUB_SPECIAL_TOKENS, QWEN2_5_OMNI_CHAT_TEMPLATE, build_tiny_processor_dir

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoTokenizer,
    Qwen2_5OmniProcessor,
    Qwen2VLImageProcessor,
    WhisperFeatureExtractor,
)
from transformers.feature_extraction_utils import BatchFeature  # noqa: E402
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize  # noqa: E402
from transformers.models.whisper import feature_extraction_whisper  # noqa: E402
from transformers.processing_utils import ProcessorMixin  # noqa: E402

MAX_GREY_STEP = 1.0 / (255 * 0.26130258)  # one grey level after normalisation (smallest CLIP std)


class TorchVideoProcessor(transformers.Qwen2VLVideoProcessor):
    """``Qwen2VLVideoProcessor._preprocess`` (4.53) with torchvision's CPU ops written out in torch."""

    def __init__(self, image_processor):
        ip = image_processor
        self.patch_size, self.merge_size, self.temporal_patch_size = ip.patch_size, ip.merge_size, 2
        self.image_mean, self.image_std, self.rescale_factor = ip.image_mean, ip.image_std, ip.rescale_factor

    def __call__(self, images=None, videos=None, min_pixels=None, max_pixels=None, return_tensors=None, **kwargs):
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        pixel_values, grids = [], []
        for video in videos:  # (T, H, W, C) uint8 from make_batched_videos
            v = torch.from_numpy(np.asarray(video)).permute(0, 3, 1, 2).contiguous()
            h, w = v.shape[-2:]
            rh, rw = smart_resize(h, w, factor=p * m, min_pixels=min_pixels, max_pixels=max_pixels)
            if (rh, rw) != (h, w):
                v = torch.nn.functional.interpolate(v, size=(rh, rw), mode="bicubic", antialias=True)
            mean = torch.tensor(self.image_mean) * (1.0 / self.rescale_factor)
            std = torch.tensor(self.image_std) * (1.0 / self.rescale_factor)
            x = v.to(torch.float32).sub(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))[None]
            if x.shape[1] % tp:
                x = torch.cat([x, x[:, -1:].repeat(1, tp - x.shape[1] % tp, 1, 1, 1)], dim=1)
            b, gt, c = x.shape[:3]
            gt, gh, gw = gt // tp, rh // p, rw // p
            x = x.view(b, gt, tp, c, gh // m, m, p, gw // m, m, p).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
            pixel_values.append(x.reshape(b * gt * gh * gw, c * tp * p * p))
            grids.append([gt, gh, gw])
        data = {"pixel_values_videos": torch.cat(pixel_values), "video_grid_thw": torch.tensor(grids)}
        return BatchFeature(data, tensor_type=return_tensors)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_processor_dir(tmp_path_factory.mktemp("tiny_omni_processor"))


@pytest.fixture(scope="module")
def proc(tiny_dir) -> OmniProcessor:
    return OmniProcessor.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def hf(tiny_dir):
    ip = Qwen2VLImageProcessor.from_pretrained(tiny_dir)
    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: type(arg)):
        return Qwen2_5OmniProcessor(
            image_processor=ip,
            video_processor=TorchVideoProcessor(ip),
            feature_extractor=WhisperFeatureExtractor.from_pretrained(tiny_dir),
            tokenizer=AutoTokenizer.from_pretrained(tiny_dir),
            chat_template=QWEN2_5_OMNI_CHAT_TEMPLATE,
        )


# ------------------------------------------------------------------------------------- the reference pipeline


def hf_conversation(messages, drop_audio: bool):
    """Our placeholder strings as transformers content lists (``drop_audio``: the paired <audio> of a video)."""
    conv = []
    for m in messages:
        items = []
        for piece in re.split(r"(<image>|<video>|<audio>)", m["content"]):
            if piece in ("<image>", "<video>", "<audio>"):
                if not (piece == "<audio>" and drop_audio):
                    items.append({"type": piece[1:-1]})
            elif piece:
                items.append({"type": "text", "text": piece})
        conv.append({"role": m["role"], "content": items})
    return conv


def hf_encode(hf, proc, messages, images=(), clips=(), waves=(), av=False, paired=False, numpy_whisper=True,
              add_generation_prompt=False):
    """The reference pipeline on the same decoded media: the plugin's pre-resize, then transformers."""
    conv = hf_conversation(messages, drop_audio=av and paired)
    with mock.patch("logging.warning"):  # the processor warns about any system prompt but the talker's
        text = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt)
    kwargs = {"return_tensors": "np"}
    if images:
        kwargs["images"] = [regularize_image(im, proc.image_max_pixels, proc.image_min_pixels, False) for im in images]
    if clips:
        videos = []
        for clip in clips:
            frames = list(clip.frames) + ([clip.frames[-1]] if len(clip.frames) % 2 else [])
            videos.append([regularize_image(f, proc.video_max_pixels, proc.video_min_pixels, True) for f in frames])
        kwargs["videos"] = videos
        assert len({c.fps for c in clips}) == 1, "the processor takes one fps for all videos of a call"
        # the reference pipeline calls the video processor itself, with its configured size bounds
        kwargs["videos_kwargs"] = {"fps": clips[0].fps, "min_pixels": proc.video_resize_min_pixels,
                                   "max_pixels": proc.video_resize_max_pixels, "use_audio_in_video": av}
    if waves:
        kwargs["audio"] = list(waves)
    with mock.patch.object(feature_extraction_whisper, "is_torch_available", lambda: not numpy_whisper):
        return hf(text=text, **kwargs)


def check_features(ours, ref_features, ref_mask, atol=0.0):
    mask = ref_mask.astype(bool)
    assert ours.feature_attention_mask.shape[0] == mask.shape[0]
    for i in range(mask.shape[0]):
        n = int(mask[i].sum())
        assert int(ours.feature_attention_mask[i].sum()) == n
        np.testing.assert_allclose(ours.input_features[i, :, :n], ref_features[i, :, :n], rtol=0, atol=atol)
        assert not ours.input_features[i, :, n:].any()


def assert_video_close(ours, ref):
    """Resized frames: torch's uint8 bicubic (int16 filter weights) vs PIL's (22-bit) differ by a grey level or
    two on a few pixels (measured on the demo videos: <= 2 levels on <= 0.27 % of the values)."""
    diff = np.abs(ours - ref)
    assert diff.max() <= 2.001 * MAX_GREY_STEP, diff.max()
    assert (diff > 1e-6).mean() < 0.005, (diff > 1e-6).mean()


def turn(user, assistant):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


# ------------------------------------------------------------------------------------------------- tokenizer


def test_tiny_tokenizer_layout(tiny_dir, proc):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert len(tok) == 1014
    for i, token in enumerate(HUB_SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(token) == 1000 + i  # hub id - 150643
    for name, tid in TINY_IDS.items():
        key = {"pad": "<|endoftext|>"}.get(name)
        assert (tok.convert_tokens_to_ids(key) if key else proc.ids[name]) == tid
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.image_token == "<|IMAGE|>"
    config = json.loads((tiny_dir / "preprocessor_config.json").read_text())
    assert config["max_pixels"] == 12845056 and config["n_samples"] == 4800000  # merged like the hub's


def test_tiny_tokenizer_is_deterministic(tiny_dir, tmp_path):
    again = build_tiny_processor_dir(tmp_path / "again")
    for name in ("tokenizer.json", "preprocessor_config.json", "chat_template.json"):
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes(), name


# ----------------------------------------------------------------------------------------- real demo records


def test_image_record_multi_turn(proc, hf):
    """mllm_demo.json record 0: two turns, the same jpg twice, second placeholder at the end of the text."""
    messages = turn("<image>Who are they?", "They're Kane and Gretzka from Bayern Munich.") + turn(
        "What are they doing?<image>", "They are celebrating on the soccer field."
    )
    images = [str(DEMO / "1.jpg")] * 2
    ours = encode_sample(messages, images, None, None, proc)
    ref = hf_encode(hf, proc, messages, images=[Image.open(p) for p in images])
    np.testing.assert_array_equal(ours.input_ids, ref["input_ids"][0])
    np.testing.assert_array_equal(ours.pixel_values, ref["pixel_values"])
    np.testing.assert_array_equal(ours.image_grid_thw, ref["image_grid_thw"])
    assert ours.image_token_counts == [int(np.prod(g)) // 4 for g in ref["image_grid_thw"]]
    assert ours.input_features is None and ours.pixel_values_videos is None


@pytest.mark.parametrize("name", ["1.mp3", "2.wav", "3.flac"])
def test_audio_record(proc, hf, name):
    messages = turn("<audio>What's that sound?", "It is the sound of glass shattering.")
    ours = encode_sample(messages, None, None, [str(DEMO / name)], proc)
    wave = load_audio(str(DEMO / name), 16000)
    ref = hf_encode(hf, proc, messages, waves=[wave])
    np.testing.assert_array_equal(ours.input_ids, ref["input_ids"][0])
    check_features(ours, ref["input_features"], ref["feature_attention_mask"])  # numpy path: bit-identical
    frames = -(-wave.size // 160)
    assert ours.input_features.shape == (1, 128, frames)
    assert ours.audio_token_counts == [audio_token_count(frames)]


def test_audio_features_vs_torch_stft_path(proc, hf):
    """With torch installed, WhisperFeatureExtractor switches to torch.stft: float32 round-off (1.7e-5 measured)."""
    messages = turn("<audio>What does the person say?", "Mister Quilter is the apostle of the middle classes.")
    ours = encode_sample(messages, None, None, [str(DEMO / "3.flac")], proc)
    ref = hf_encode(hf, proc, messages, waves=[load_audio(str(DEMO / "3.flac"), 16000)], numpy_whisper=False)
    check_features(ours, ref["input_features"], ref["feature_attention_mask"], atol=3e-5)


def test_video_record_no_resize_is_exact(proc, hf):
    """4.mp4 is 224x224 at 30 fps: 10 frames at 2 fps, no resize anywhere -> patches bit-identical."""
    messages = turn("<video>What is the video describing?", "A girl who is drawing a picture of a guitar.")
    ours = encode_sample(messages, None, [str(DEMO / "4.mp4")], None, proc)
    clip = load_video(str(DEMO / "4.mp4"), video_fps=2.0, video_maxlen=128)
    ref = hf_encode(hf, proc, messages, clips=[clip])
    np.testing.assert_array_equal(ours.input_ids, ref["input_ids"][0])
    np.testing.assert_array_equal(ours.video_grid_thw, [[5, 16, 16]])
    np.testing.assert_array_equal(ours.pixel_values_videos, ref["pixel_values_videos"])
    np.testing.assert_array_equal(ours.video_second_per_grid, np.asarray(ref["video_second_per_grid"], np.float64))
    assert ours.video_token_counts == [320]


@pytest.mark.parametrize("name", ["1.mp4", "2.avi", "3.mp4"])
def test_video_record_with_resize(proc, hf, name):
    """Frames pre-resized to <= 256*256 (nearest), then bicubic to multiples of 28 (1.mp4: 341x192 -> 336x196,
    shrinking one side and enlarging the other)."""
    messages = turn("<video>What is happening?", "Something.")
    ours = encode_sample(messages, None, [str(DEMO / name)], None, proc)
    clip = load_video(str(DEMO / name), video_fps=2.0, video_maxlen=128)
    ref = hf_encode(hf, proc, messages, clips=[clip])
    np.testing.assert_array_equal(ours.input_ids, ref["input_ids"][0])
    np.testing.assert_array_equal(ours.video_grid_thw, ref["video_grid_thw"])
    assert_video_close(ours.pixel_values_videos, ref["pixel_values_videos"])


def test_video_patches_vs_image_processor_video_path(proc):
    """Qwen2VLImageProcessor(videos=...) (the deprecated PIL path): same patches up to the rounding of its
    separate rescale / normalise steps vs the video processor's fused float32 normalisation."""
    clip = load_video(str(DEMO / "4.mp4"), video_fps=2.0, video_maxlen=128)
    ours, grid = proc.video_patches(clip.frames)
    ref = proc.image_processor(images=None, videos=[clip.frames], return_tensors="np")
    np.testing.assert_array_equal(ref["video_grid_thw"], [grid])
    np.testing.assert_allclose(ours, ref["pixel_values_videos"], rtol=0, atol=3e-7)


def test_audio_in_video_paired_record(proc, hf):
    """mllm_video_audio_demo.json: '<video><audio>...' with 4.mp4 + 4.mp3, use_audio_in_video."""
    messages = turn("<video><audio>What is the video describing?", "A girl who is drawing a picture of a guitar.")
    ours = encode_sample(messages, None, [str(DEMO / "4.mp4")], [str(DEMO / "4.mp3")], proc, use_audio_in_video=True)
    clip = load_video(str(DEMO / "4.mp4"), video_fps=2.0, video_maxlen=128)
    wave = load_audio(str(DEMO / "4.mp3"), 16000)
    ref = hf_encode(hf, proc, messages, clips=[clip], waves=[wave], av=True, paired=True)
    np.testing.assert_array_equal(ours.input_ids, ref["input_ids"][0])
    np.testing.assert_array_equal(ours.pixel_values_videos, ref["pixel_values_videos"])
    check_features(ours, ref["input_features"], ref["feature_attention_mask"])
    assert ours.use_audio_in_video and ours.audio_token_counts == [125] and ours.video_token_counts == [320]
    ids = ours.input_ids.tolist()
    start = ids.index(TINY_IDS["vision_bos"])
    assert ids[start + 1] == TINY_IDS["audio_bos"]
    # 2-second chunks: video t slices are 1 s apart (25 positions), so 2 slices (128 tokens) per 50 audio tokens
    block = ids[start + 2: start + 2 + 128 + 50]
    assert block == [TINY_IDS["video"]] * 128 + [TINY_IDS["audio"]] * 50


def test_audio_in_video_from_sound_track(proc, hf, tmp_path):
    """A video without an <audio> partner takes its own sound track (what transformers' flag means)."""
    path = write_video(tmp_path / "av.avi", n_frames=36, fps=12, size=(96, 64), audio_rate=22050, audio_seconds=3.0)
    messages = [{"role": "system", "content": "Watch and listen."}] + turn("<video>Describe it.", "A tone.")
    ours = encode_sample(messages, None, [str(path)], None, proc, use_audio_in_video=True)
    clip = load_video(str(path), video_fps=2.0, video_maxlen=128)
    ref = hf_encode(hf, proc, messages, clips=[clip], waves=[load_audio(str(path), 16000)], av=True)
    np.testing.assert_array_equal(ours.input_ids, ref["input_ids"][0])
    check_features(ours, ref["input_features"], ref["feature_attention_mask"])
    assert ours.use_audio_in_video and len(ours.audio_token_counts) == 1


def test_mixed_record_order(proc, hf, tmp_path):
    """Images, a video and audios interleaved over two turns: everything consumed in text order."""
    vid = write_video(tmp_path / "v.avi", n_frames=8, fps=4, size=(100, 70))
    messages = turn("<audio>Listen. <image> and <video>?", "Fine.") + turn("Now <image><audio>", "Done.")
    images, audios = [str(DEMO / "2.jpg"), str(DEMO / "3.jpg")], [str(DEMO / "2.wav"), str(DEMO / "3.flac")]
    ours = encode_sample(messages, images, [str(vid)], audios, proc)
    ref = hf_encode(hf, proc, messages, images=[Image.open(p) for p in images],
                    clips=[load_video(str(vid), video_fps=2.0, video_maxlen=128)],
                    waves=[load_audio(a, 16000) for a in audios])
    np.testing.assert_array_equal(ours.input_ids, ref["input_ids"][0])
    np.testing.assert_array_equal(ours.pixel_values, ref["pixel_values"])
    assert_video_close(ours.pixel_values_videos, ref["pixel_values_videos"])
    check_features(ours, ref["input_features"], ref["feature_attention_mask"])
    assert not ours.use_audio_in_video


@pytest.mark.parametrize("seed", range(6))
def test_audio_in_video_interleave_random(proc, hf, seed):
    """Token runs vs replace_multimodal_special_tokens on random grids, rates and audio lengths (incl. slices
    more than 2 s apart, where get_chunked_index splits one slice over several chunks)."""
    rng = np.random.default_rng(seed)
    grid = (int(rng.integers(1, 12)), 2 * int(rng.integers(1, 6)), 2 * int(rng.integers(1, 6)))
    spg = float(rng.choice([0.08, 0.5, 1.0, 2.0 / 1.9547325102880657, 2.4, 3.7]))
    mel = int(rng.integers(3, 3000))
    text = hf.vision_bos_token + hf.video_token + hf.vision_eos_token
    expanded = hf.replace_multimodal_special_tokens(
        [text], iter([audio_token_count(mel)]), iter([]), iter([np.array(grid)]), video_second_per_grid=iter([spg]),
        use_audio_in_video=True, position_id_per_seconds=25, seconds_per_chunk=2.0,
    )[0]
    assert proc.audio_in_video_tokens(grid, spg, mel) == hf.tokenizer.encode(expanded)


@pytest.mark.parametrize("seed", range(4))
def test_chunk_counts_vs_get_chunked_index(seed):
    rng = np.random.default_rng(seed)
    values = np.sort(rng.integers(0, 400, rng.integers(1, 300))) * rng.choice([1.0, 0.37, 2.6])
    chunks = Qwen2_5OmniProcessor.get_chunked_index(None, values, 50)
    assert chunk_counts(values, 50) == [b - a for a, b in chunks]


# ---------------------------------------------------------------------------------------------------- labels


def label_reference(hf, proc, messages, images, train_on_prompt, mask_history):
    """Labels from the real processor: turn k's source ends where the conversation up to its user message with a
    generation prompt ends, its target where the conversation up to its answer ends."""
    start = 1 if messages[0]["role"] == "system" else 0
    n_turns = (len(messages) - start) // 2
    ids = hf_encode(hf, proc, messages, images=images)["input_ids"][0]
    labels, prev = [], 0
    for k in range(n_turns):
        src_end = hf_encode(hf, proc, messages[: start + 2 * k + 1], images=images,
                            add_generation_prompt=True)["input_ids"].shape[1]
        tgt_end = hf_encode(hf, proc, messages[: start + 2 * k + 2], images=images)["input_ids"].shape[1]
        labels += ids[prev:src_end].tolist() if train_on_prompt else [IGNORE_INDEX] * (src_end - prev)
        trained = not mask_history or k == n_turns - 1
        labels += ids[src_end:tgt_end].tolist() if trained else [IGNORE_INDEX] * (tgt_end - src_end)
        prev = tgt_end
    assert prev == ids.size
    return np.array(labels)


@pytest.mark.parametrize("train_on_prompt,mask_history", [(False, False), (True, False), (False, True), (True, True)])
def test_labels(proc, hf, train_on_prompt, mask_history):
    messages = [{"role": "system", "content": "Be brief."}] + turn("<image>Who is he?", "He's Thomas Muller.") + turn(
        "Why is he on the ground?", "Because he's sliding on his knees.\n"
    ) + turn("And then?", "He gets up.")
    images = [str(DEMO / "2.jpg")]
    ours = encode_sample(messages, images, None, None, proc, train_on_prompt=train_on_prompt,
                         mask_history=mask_history)
    expected = label_reference(hf, proc, messages, [Image.open(images[0])], train_on_prompt, mask_history)
    np.testing.assert_array_equal(ours.labels, expected)
    np.testing.assert_array_equal(ours.attention_mask, np.ones_like(ours.input_ids))
    # the trained part of the last answer: its text, <|im_end|> and the newline after it
    tail = ours.labels[-4:].tolist()
    assert tail[-2:] == [TINY_IDS["im_end"], proc.tokenizer.encode("\n")[0]]


def test_default_system_prompt(proc):
    ours = encode_sample(turn("Hi", "Hello"), None, None, None, proc)
    text = proc.tokenizer.decode(ours.input_ids)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\nHello<|im_end|>\n")
    assert (ours.labels != IGNORE_INDEX).sum() == len(proc.tokenizer.encode("Hello")) + 2


# ------------------------------------------------------------------------------------------ image pre-resize


def test_image_pre_resize_rules():
    """The reference plugin's _preprocess_image: max / min pixels by sqrt factor (int), RGB, >= 28 px, ratio."""
    big = Image.new("RGB", (1000, 800), (10, 20, 30))
    f = (768 * 768 / (1000 * 800)) ** 0.5
    assert regularize_image(big, 768 * 768, 32 * 32, nearest=False).size == (int(1000 * f), int(800 * f))
    small = Image.new("L", (10, 5), 7)
    out = regularize_image(small, 768 * 768, 32 * 32, nearest=False)
    g = (32 * 32 / 50) ** 0.5
    assert out.mode == "RGB" and out.size == (max(int(10 * g), 28), max(int(5 * g), 28))
    wide = Image.new("RGB", (6000, 28), 0)
    assert regularize_image(wide, 10**9, 0, nearest=False).size == (28 * 180, 28)
    pal = Image.new("P", (300, 300), 1)
    expected = pal.resize((int(300 * (0.5**0.5)),) * 2, Image.Resampling.NEAREST).convert("RGB")
    got = regularize_image(pal, 300 * 300 // 2, 0, nearest=False)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))  # PIL's default filter for "P": nearest


# ------------------------------------------------------------------------------------------------ long audio


def test_long_audio_cut_with_a_log(tiny_dir, tmp_path, caplog):
    short = tmp_path / "short"
    shutil.copytree(tiny_dir, short)
    cfg = json.loads((short / "preprocessor_config.json").read_text())
    cfg.update(chunk_length=2, n_samples=32000, nb_max_frames=200)
    (short / "preprocessor_config.json").write_text(json.dumps(cfg))
    proc2 = OmniProcessor.from_pretrained(short)
    wave = (0.3 * np.sin(np.arange(51200) * 0.05)).astype(np.float32)  # 3.2 s
    with caplog.at_level(logging.WARNING, logger="omni_fast.data"):
        ours = encode_sample(turn("<audio>?", "A tone."), None, None, [wave], proc2)
    assert "1.2 s dropped" in caplog.text and ours.audio_seconds_dropped == pytest.approx(1.2)
    fe = WhisperFeatureExtractor.from_pretrained(short)
    with mock.patch.object(feature_extraction_whisper, "is_torch_available", lambda: False):
        ref = fe(wave, sampling_rate=16000, return_attention_mask=True, padding="max_length", return_tensors="np")
    check_features(ours, ref["input_features"], ref["attention_mask"])
    assert ours.audio_token_counts == [audio_token_count(200)]


# ---------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "messages,images,videos,audios,match",
    [
        (turn("<image><image>x", "y"), ["a.jpg"], None, None, r"2 <image> placeholder\(s\) .* but 1 images"),
        (turn("x", "y"), None, ["v.mp4"], None, r"0 <video> placeholder\(s\) .* but 1 videos"),
        (turn("<audio>x", "y"), None, None, None, r"1 <audio> placeholder\(s\) .* but 0 audios"),
        ([{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}], None, None, None, "message 0"),
        ([{"role": "user", "content": "x"}], None, None, None, "complete user/assistant pairs"),
        ([{"role": "system", "content": "<image>"}] + turn("x", "y"), ["a.jpg"], None, None, "system message"),
        ([{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}], None, None, None, "message 0"),
        ([{"role": "system", "content": "s"}, {"role": "user", "content": "x"}, {"role": "bot", "content": "y"}],
         None, None, None, "message 2: role 'bot'"),
    ],
)
def test_malformed_records(proc, messages, images, videos, audios, match):
    with pytest.raises(ValueError, match=match):
        encode_sample(messages, images, videos, audios, proc)


def test_audio_in_video_pairing_errors(proc):
    v, a = str(DEMO / "4.mp4"), str(DEMO / "4.mp3")
    with pytest.raises(ValueError, match="must follow its <video>"):
        encode_sample(turn("<audio><video>x", "y"), None, [v], [a], proc, use_audio_in_video=True)
    with pytest.raises(ValueError, match=r"number of videos \(2\) must match number of audios \(1\)"):
        encode_sample(turn("<video><video><audio>x", "y"), None, [v, v], [a], proc, use_audio_in_video=True)
    with pytest.raises(ValueError, match="must be followed by an <audio>"):
        encode_sample(turn("<video><video><audio>x", "<audio>"), None, [v, v], [a, a], proc, use_audio_in_video=True)
    with pytest.raises(MediaError, match=r"4\.mp4: no audio stream"):
        encode_sample(turn("<video>x", "y"), None, [v], None, proc, use_audio_in_video=True)


def test_media_errors_name_the_file(proc, tmp_path):
    with pytest.raises(MediaError, match="missing.jpg: file not found"):
        encode_sample(turn("<image>x", "y"), [str(tmp_path / "missing.jpg")], None, None, proc)
    with pytest.raises(MediaError, match="too short"):
        encode_sample(turn("<audio>x", "y"), None, None, [np.zeros(200, np.float32)], proc)


def test_processor_construction_errors(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        OmniProcessor.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no preprocessor_config.json"):
        OmniProcessor.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="audio_sampling_rate 22050"):
        OmniProcessor.from_pretrained(tiny_dir, audio_sampling_rate=22050)


# ----------------------------------------------------------------------------------------------- no torch


def test_runtime_path_needs_no_torch(tmp_path):
    """Build the tiny directory and encode an image + video + audio-in-video record with torch unimportable."""
    script = f"""
import sys
sys.modules["torch"] = None  # as on a machine without torch: any import of it fails
from omni_fast.data import OmniProcessor, build_tiny_processor_dir, encode_sample
d = build_tiny_processor_dir({str(tmp_path / "tiny")!r})
proc = OmniProcessor.from_pretrained(d, use_audio_in_video=True)
s = encode_sample(
    [{{"role": "user", "content": "<image><video><audio>What?"}}, {{"role": "assistant", "content": "This."}}],
    [{str(DEMO / "1.jpg")!r}], [{str(DEMO / "4.mp4")!r}], [{str(DEMO / "4.mp3")!r}], proc,
)
assert s.pixel_values.shape[0] > 0 and s.pixel_values_videos.shape[0] > 0 and s.input_features.shape[0] == 1
assert sys.modules["torch"] is None, "torch was imported"
print("ok", s.input_ids.size)
"""
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok")
