"""Media decoding (omni_fast.data.media): the demo files of every type, frame sampling, resampling, errors."""

from __future__ import annotations

import math
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from omni_fast.data.media import MediaError, load_audio, load_image, load_video, sample_video_indices

DEMO = Path(__file__).resolve().parents[2] / "shared" / "data" / "llamafactory_demo" / "mllm_demo_data"


def write_video(
    path: Path,
    n_frames: int,
    fps: int,
    size: tuple[int, int] = (64, 48),
    audio_rate: int | None = None,
    audio_seconds: float = 0.0,
    tone_hz: float = 440.0,
) -> Path:
    """A lossless (ffv1) video whose frame i is grey level 10*i (mod 250), optionally with a stereo sine track."""
    w, h = size
    with av.open(str(path), "w") as c:
        vs = c.add_stream("ffv1", rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        aus = None
        if audio_rate:
            aus = c.add_stream("pcm_s16le", rate=audio_rate)
            aus.layout = "stereo"
        for i in range(n_frames):
            img = np.full((h, w, 3), (10 * i) % 250, np.uint8)
            img[: h // 2, : w // 2, 0] = 255 - (10 * i) % 250  # some colour structure for the resize paths
            c.mux(vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        c.mux(vs.encode())
        if aus is not None:
            t = np.arange(int(audio_rate * audio_seconds)) / audio_rate
            x = (0.5 * np.sin(2 * np.pi * tone_hz * t) * 32767).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(np.stack([x, x]).T.reshape(1, -1).copy(), format="s16", layout="stereo")
            frame.sample_rate, frame.pts = audio_rate, 0
            c.mux(aus.encode(frame))
            c.mux(aus.encode())
    return path


def write_wav(path: Path, signal: np.ndarray, rate: int) -> Path:
    """Stereo or mono int16 PCM WAV from float samples in [-1, 1] (shape (n,) or (channels, n))."""
    sig = np.atleast_2d(signal)
    layout = "mono" if sig.shape[0] == 1 else "stereo"
    with av.open(str(path), "w") as c:
        s = c.add_stream("pcm_s16le", rate=rate)
        s.layout = layout
        data = (np.clip(sig, -1, 1) * 32767).astype(np.int16).T.reshape(1, -1).copy()
        frame = av.AudioFrame.from_ndarray(data, format="s16", layout=layout)
        frame.sample_rate, frame.pts = rate, 0
        c.mux(s.encode(frame))
        c.mux(s.encode())
    return path


# ------------------------------------------------------------------------------------------------- demo files


@pytest.mark.parametrize("name,size", [("1.jpg", (300, 168)), ("2.jpg", (300, 199)), ("3.jpg", (300, 166))])
def test_demo_images(name, size):
    im = load_image(str(DEMO / name))
    assert im.mode == "RGB" and im.size == size
    assert np.asarray(im).std() > 10  # real pixels, not a blank


@pytest.mark.parametrize(
    "name,rate,seconds",
    [("1.mp3", 48000, 4.032), ("2.wav", 16000, 2.9013125), ("3.flac", 16000, 5.855), ("4.mp3", 44100, 5.0)],
)
def test_demo_audio_resampled_to_16k_mono(name, rate, seconds):
    x = load_audio(str(DEMO / name), 16000)
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(x.size - seconds * 16000) <= 2, (x.size, seconds * 16000)
    assert 0.05 < np.abs(x).max() < 1.2 and np.isfinite(x).all()


def test_demo_wav_at_16k_is_only_converted():
    """2.wav is 16 kHz mono s16: decoding is the exact int16 / 32768 conversion, nothing resampled."""
    x = load_audio(str(DEMO / "2.wav"), 16000)
    with av.open(str(DEMO / "2.wav")) as c:
        raw = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    np.testing.assert_array_equal(x, raw.astype(np.float32) / 32768)


@pytest.mark.parametrize(
    "name,total,duration",
    [("1.mp4", 243, 9.72), ("2.avi", 270, 9.025069637883009), ("3.mp4", 146, 6.088333333333333), ("4.mp4", 150, 5.0)],
)
def test_demo_videos_sampled_at_2fps(name, total, duration):
    clip = load_video(str(DEMO / name), video_fps=2.0, video_maxlen=128)
    n = min(total, 128, max(1, math.floor(duration * 2.0)))
    np.testing.assert_array_equal(clip.indices, np.linspace(0, total - 1, n).astype(np.int32))
    assert len(clip.frames) == n and all(f.mode == "RGB" for f in clip.frames)
    assert clip.duration == pytest.approx(duration) and clip.fps == pytest.approx(n / duration)


def test_demo_video_maxlen_caps_the_frames():
    clip = load_video(str(DEMO / "1.mp4"), video_fps=10.0, video_maxlen=7)
    np.testing.assert_array_equal(clip.indices, np.linspace(0, 242, 7).astype(np.int32))
    assert len(clip.frames) == 7 and clip.fps == pytest.approx(7 / 9.72)


def test_demo_video_without_sound_track():
    with pytest.raises(MediaError, match=r"4\.mp4: no audio stream"):
        load_audio(str(DEMO / "4.mp4"))


# ------------------------------------------------------------------------------------------- frame sampling


@pytest.mark.parametrize(
    "total,duration,fps,maxlen,expected_n",
    [(243, 9.72, 2.0, 128, 19), (150, 5.0, 2.0, 4, 4), (3, 0.1, 2.0, 128, 1), (10, 100.0, 2.0, 128, 10)],
)
def test_sample_video_indices_rule(total, duration, fps, maxlen, expected_n):
    idx = sample_video_indices(total, duration, fps, maxlen)
    assert idx.dtype == np.int32 and idx.size == expected_n
    assert idx[0] == 0 and (expected_n == 1 or idx[-1] == total - 1) and (np.diff(idx) > 0).all()


def test_sample_video_indices_unknown_frame_count_takes_first_frames():
    np.testing.assert_array_equal(sample_video_indices(0, 12.0, 2.0, 5), np.arange(5))


def test_sampled_frames_are_the_indexed_ones(tmp_path):
    path = write_video(tmp_path / "v.avi", n_frames=25, fps=10)
    clip = load_video(str(path), video_fps=2.0, video_maxlen=128)
    np.testing.assert_array_equal(clip.indices, [0, 6, 12, 18, 24])
    grey = [int(np.asarray(f)[-1, -1, 1]) for f in clip.frames]
    np.testing.assert_allclose(grey, [10 * i for i in clip.indices], atol=2)
    assert clip.fps == pytest.approx(2.0) and clip.duration == pytest.approx(2.5)


def test_video_sound_track_resampled(tmp_path):
    path = write_video(tmp_path / "av.avi", n_frames=20, fps=10, audio_rate=22050, audio_seconds=2.0, tone_hz=440)
    x = load_audio(str(path), 16000)
    assert abs(x.size - 32000) <= 2
    spectrum = np.abs(np.fft.rfft(x[1000:-1000]))
    peak_hz = np.argmax(spectrum) * 16000 / (x.size - 2000)
    assert abs(peak_hz - 440) < 2
    assert np.abs(x[1000:-1000]).max() == pytest.approx(0.5, abs=0.01)  # identical channels average to themselves


def test_stereo_is_averaged_and_resampled(tmp_path):
    rate = 44100
    t = np.arange(rate * 3) / rate
    left, right = 0.6 * np.sin(2 * np.pi * 300 * t), 0.2 * np.sin(2 * np.pi * 300 * t)
    x = load_audio(str(write_wav(tmp_path / "s.wav", np.stack([left, right]), rate)), 16000)
    assert abs(x.size - 48000) <= 2
    assert np.abs(x[2000:-2000]).max() == pytest.approx(0.4, abs=0.01)  # (0.6 + 0.2) / 2


# ---------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("loader", ["image", "video", "audio"])
def test_missing_file_named(loader, tmp_path):
    path = str(tmp_path / "nope.bin")
    call = {
        "image": lambda: load_image(path),
        "video": lambda: load_video(path, video_fps=2.0, video_maxlen=8),
        "audio": lambda: load_audio(path),
    }[loader]
    with pytest.raises(MediaError, match="nope.bin: file not found") as info:
        call()
    assert info.value.path == path and isinstance(info.value, ValueError)


@pytest.mark.parametrize("suffix", [".jpg", ".mp4", ".wav"])
def test_corrupt_file_named(suffix, tmp_path):
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(MediaError, match=f"bad\\{suffix}: cannot"):
        if suffix == ".jpg":
            load_image(str(path))
        elif suffix == ".mp4":
            load_video(str(path), video_fps=2.0, video_maxlen=8)
        else:
            load_audio(str(path))


def test_truncated_jpeg_named(tmp_path):
    good = (DEMO / "2.jpg").read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(good[: len(good) // 3])
    with pytest.raises(MediaError, match=r"cut\.jpg: cannot decode image"):
        load_image(str(path))


def test_audio_file_is_not_a_video():
    with pytest.raises(MediaError, match=r"1\.mp3: no video stream"):
        load_video(str(DEMO / "1.mp3"), video_fps=2.0, video_maxlen=8)


def test_image_keeps_its_mode(tmp_path):
    """Conversion to RGB happens after the reference's pre-resize (processor), so decoding keeps the mode."""
    path = tmp_path / "p.png"
    Image.new("P", (40, 30), 3).save(path)
    assert load_image(str(path)).mode == "P"
