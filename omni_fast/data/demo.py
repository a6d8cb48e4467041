"""A small demo dataset the project generates itself, and the data.json files that train on it.

    python -m omni_fast.data.demo --out ./data/demo

writes, under ``--out``:

* ``media/``: images drawn with PIL (PNG and JPEG), two short MP4 clips (MPEG-4 video with an AAC sound track,
  written with PyAV) with the same sound as separate WAV files, and synthetic tone audio (a 16 kHz WAV and a
  22.05 kHz FLAC, so resampling is exercised);
* ``mllm_demo.json``: the mllm format (what ``omni_fast.data.llava_to_mllm`` writes) — image records, a record with
  two images over two turns, a system prompt, and text-only records mixed in;
* ``video_audio_demo.json``: LLaMA-Factory's video+audio format (``<video><audio>`` with ``videos`` + ``audios``);
* ``audio_demo.json``: ``<audio>`` questions;
* ``tiny_processor/``: the tiny tokenizer and processor settings (``omni_fast.data.tiny_tokenizer``);
* ``data_mllm.json``, ``data_video_audio.json`` (``use_audio_in_video: true``) and ``data.json`` (all three files
  joined with ``,``): MindSpeed-MM data configs pointing at the above, ``dataset_dir`` being ``--out`` as given
  (so a relative ``--out`` gives paths relative to the working directory, as in the guide).

The answers are fixed functions of the media (shape, colour, motion, pitch), so a model can learn them and the loss
of a short run falls visibly. Everything is deterministic and small (~100 tokens per sample with the demo's pixel
limits), so the trainer's embedded default can train on it in minutes on two cores: it calls
:func:`ensure_demo_data`, which builds the directory once (atomically) and reuses it afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import wave
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["DEMO_FILES", "demo_data_configs", "ensure_demo_data", "main", "write_demo_data"]

DEMO_VERSION = 1  # bump when the generated content changes; ensure_demo_data rebuilds older directories
_MARKER = ".omni_fast_demo"
DEMO_FILES = {"all": "data.json", "mllm": "data_mllm.json", "video_audio": "data_video_audio.json"}
PROCESSOR_DIR = "tiny_processor"

WHITE = (255, 255, 255)
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 60, 220)}
SR = 16000


# ---------------------------------------------------------------------------------------------------- media


def _draw(size: tuple[int, int], shapes: list[tuple[str, str, tuple[int, int, int, int]]]) -> Image.Image:
    img = Image.new("RGB", size, WHITE)
    d = ImageDraw.Draw(img)
    for kind, colour, (x0, y0, x1, y1) in shapes:
        fill = COLOURS[colour]
        if kind == "circle":
            d.ellipse((x0, y0, x1, y1), fill=fill)
        elif kind == "square":
            d.rectangle((x0, y0, x1, y1), fill=fill)
        else:  # triangle
            d.polygon([((x0 + x1) // 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return img


def _tone(seconds: float, rate: int, f0: float, f1: float | None = None, amp: float = 0.3) -> np.ndarray:
    """A sine sweeping linearly from f0 to f1 Hz (a steady tone when f1 is None), with 10 ms fades."""
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    f1 = f0 if f1 is None else f1
    phase = 2 * np.pi * (f0 * t + 0.5 * (f1 - f0) / seconds * t**2)
    fade = np.minimum(1.0, np.minimum(t, seconds - t) / 0.01)
    return (amp * np.sin(phase) * fade).astype(np.float32)


def _write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    pcm = np.clip(np.round(samples * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def _write_audio(path: Path, samples: np.ndarray, rate: int, codec: str) -> None:
    import av

    with av.open(str(path), "w") as c:
        stream = c.add_stream(codec, rate=rate, layout="mono")
        fmt = "s16" if codec == "flac" else "fltp"
        data = np.round(samples * 32767).astype(np.int16) if fmt == "s16" else samples
        for k in range(0, len(data), 1024):
            frame = av.AudioFrame.from_ndarray(data[None, k : k + 1024], format=fmt, layout="mono")
            frame.sample_rate = rate
            frame.pts = k
            c.mux(stream.encode(frame))
        c.mux(stream.encode(None))


def _write_clip(path: Path, frames: list[np.ndarray], fps: int, sound: np.ndarray) -> None:
    """An MP4 with an MPEG-4 video stream and an AAC sound track (mono, 16 kHz)."""
    import av

    h, w, _ = frames[0].shape
    with av.open(str(path), "w") as c:
        video = c.add_stream("mpeg4", rate=fps)
        video.width, video.height, video.pix_fmt = w, h, "yuv420p"
        video.bit_rate = 2_000_000  # near-lossless at this size, so the decoded colours stay what the answers say
        audio = c.add_stream("aac", rate=SR, layout="mono")
        for rgb in frames:
            c.mux(video.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        c.mux(video.encode(None))
        for k in range(0, len(sound), 1024):
            frame = av.AudioFrame.from_ndarray(sound[None, k : k + 1024], format="fltp", layout="mono")
            frame.sample_rate = SR
            frame.pts = k
            c.mux(audio.encode(frame))
        c.mux(audio.encode(None))


def _moving(shape: str, colour: str, n: int, size: int = 64, grow: bool = False) -> list[np.ndarray]:
    frames = []
    for i in range(n):
        if grow:
            r = 6 + i * (size // 2 - 8) // max(n - 1, 1)
            box = (size // 2 - r, size // 2 - r, size // 2 + r, size // 2 + r)
        else:
            x = 2 + i * (size - 22) // max(n - 1, 1)
            box = (x, size // 2 - 9, x + 18, size // 2 + 9)
        frames.append(np.asarray(_draw((size, size), [(shape, colour, box)])))
    return frames


def _write_media(media: Path) -> None:
    media.mkdir(parents=True, exist_ok=True)
    _draw((112, 112), [("circle", "red", (24, 24, 88, 88))]).save(media / "red_circle.png")
    _draw((140, 112), [("square", "green", (40, 26, 100, 86))]).save(media / "green_square.png")
    _draw((112, 84), [("triangle", "blue", (30, 12, 82, 72))]).save(media / "blue_triangle.png")
    _draw((168, 112), [("circle", "red", (14, 30, 66, 82)), ("square", "blue", (100, 30, 152, 82))]).save(
        media / "two_shapes.jpg", quality=95
    )
    low = _tone(2.0, SR, 330.0)
    rising = _tone(2.0, SR, 500.0, 1000.0)
    _write_clip(media / "square_moves.mp4", _moving("square", "red", 16), 8, low)
    _write_wav(media / "square_moves.wav", low, SR)
    _write_clip(media / "circle_grows.mp4", _moving("circle", "blue", 16, grow=True), 8, rising)
    _write_wav(media / "circle_grows.wav", rising, SR)
    _write_wav(media / "low_tone.wav", _tone(1.5, SR, 220.0), SR)
    _write_audio(media / "falling_tone.flac", _tone(2.0, 22050, 900.0, 300.0), 22050, "flac")


# ---------------------------------------------------------------------------------------------------- records


def _turns(*pairs: str) -> list[dict[str, str]]:
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": text} for i, text in enumerate(pairs)]


def _records() -> dict[str, list[dict]]:
    mllm = [
        {"images": ["media/red_circle.png"], "messages": _turns("<image>What shape is in the picture?",
                                                                 "A red circle on a white background.")},
        {"images": ["media/green_square.png"], "messages": _turns("<image>Describe the image.",
                                                                   "A green square on a white background.")},
        {"images": ["media/blue_triangle.png"], "messages": _turns("What colour is the triangle?<image>",
                                                                    "The triangle is blue.")},
        {"images": ["media/two_shapes.jpg", "media/two_shapes.jpg"],
         "messages": _turns("<image>How many shapes are there?", "There are two shapes.",
                            "What are they?<image>", "A red circle and a blue square.")},
        {"images": [], "messages": _turns("What is two plus three?", "Two plus three is five.")},
        {"messages": _turns("Say hello.", "Hello!", "Now say goodbye.", "Goodbye!")},
        {"images": ["media/red_circle.png"],
         "messages": [{"role": "system", "content": "You answer with one word."}]
         + _turns("<image>Which colour is the circle?", "Red.")},
        {"messages": _turns("Name a primary colour.", "Blue is a primary colour.")},
    ]
    video_audio = [
        {"messages": _turns("<video><audio>What is the video describing?",
                            "A red square moves from left to right while a low tone plays."),
         "videos": ["media/square_moves.mp4"], "audios": ["media/square_moves.wav"]},
        {"messages": _turns("<video><audio>What happens in the video?",
                            "A blue circle grows while the tone rises."),
         "videos": ["media/circle_grows.mp4"], "audios": ["media/circle_grows.wav"]},
        {"messages": _turns("<video><audio>What can you hear?", "A low steady tone."),
         "videos": ["media/square_moves.mp4"], "audios": ["media/square_moves.wav"]},
    ]
    audio = [
        {"messages": _turns("<audio>What can you hear?", "A low steady tone."), "audios": ["media/low_tone.wav"]},
        {"messages": _turns("<audio>Is the tone rising or falling?", "It is falling."),
         "audios": ["media/falling_tone.flac"]},
    ]
    return {"mllm_demo.json": mllm, "video_audio_demo.json": video_audio, "audio_demo.json": audio}


def demo_data_configs(root: str) -> dict[str, dict]:
    """The demo's data.json files (file name -> content) for a demo directory reachable as ``root``."""
    root = root.rstrip("/") or "/"

    def config(dataset: str, attr: dict, use_audio_in_video: bool) -> dict:
        return {
            "dataset_param": {
                "dataset_type": "huggingface",
                "preprocess_parameters": {
                    "model_name_or_path": f"{root}/{PROCESSOR_DIR}",
                    "image_max_pixels": 112 * 112,
                    "image_min_pixels": 0,
                    "video_max_pixels": 56 * 56,
                    "video_min_pixels": 0,
                    "video_fps": 2.0,
                    "video_maxlen": 8,
                    "use_audio_in_video": use_audio_in_video,
                    "audio_sampling_rate": 16000,
                },
                "basic_parameters": {
                    "template": "qwen2_omni",
                    "dataset_dir": root,
                    "dataset": dataset,
                    "cache_dir": f"{root}/cache",
                    "train_on_prompt": False,
                    "mask_history": False,
                    "preprocessing_batch_size": 1000,
                    "preprocessing_num_workers": 1,
                    "max_samples": None,
                },
                "attr": {
                    "system": None,
                    "images": None,
                    "videos": None,
                    "audios": None,
                    "messages": "messages",
                    "role_tag": "role",
                    "content_tag": "content",
                    "user_tag": "user",
                    "assistant_tag": "assistant",
                    "observation_tag": None,
                    "function_tag": None,
                    "system_tag": "system",
                    **attr,
                },
            },
            "dataloader_param": {
                "dataloader_mode": "sampler",
                "drop_last": True,
                "sampler_type": "BaseRandomBatchSampler",
                "collate_param": {"model_name": "qwen2vl", "ignore_pad_token_for_loss": True},
                "pin_memory": True,
                "shuffle": True,
            },
        }

    every = {"images": "images", "videos": "videos", "audios": "audios"}
    return {
        DEMO_FILES["mllm"]: config("mllm_demo.json", {"images": "images"}, False),
        DEMO_FILES["video_audio"]: config("video_audio_demo.json", {"videos": "videos", "audios": "audios"}, True),
        DEMO_FILES["all"]: config("mllm_demo.json,video_audio_demo.json,audio_demo.json", every, True),
    }


def _dump(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _is_current(root: Path) -> bool:
    marker = root / _MARKER
    return marker.is_file() and marker.read_text().strip() == str(DEMO_VERSION)


def write_demo_data(out: str | os.PathLike, *, processor: bool = True, dataset_dir: str | None = None) -> Path:
    """Write the demo dataset into ``out`` (created; existing demo files are replaced); see the module doc.

    The data.json files name ``dataset_dir`` (default: ``out`` as given) as the place of the data.
    """
    out_path = Path(out)
    out_path.mkdir(parents=True, exist_ok=True)
    _write_media(out_path / "media")
    for name, records in _records().items():
        _dump(out_path / name, records)
    for name, config in demo_data_configs(str(out) if dataset_dir is None else dataset_dir).items():
        _dump(out_path / name, config)
    if processor:
        from omni_fast.data.tiny_tokenizer import build_tiny_processor_dir

        build_tiny_processor_dir(out_path / PROCESSOR_DIR)
    (out_path / _MARKER).write_text(f"{DEMO_VERSION}\n")
    return out_path


def ensure_demo_data(root: str | os.PathLike) -> Path:
    """The demo directory at ``root`` (absolute paths inside), built once; safe to call from several processes.

    Returns ``root`` resolved; ``root / "data.json"`` trains on everything (``DEMO_FILES`` names the others). The
    directory is built under a temporary name and renamed into place, so a reader never sees half of it. A demo
    directory of an older ``DEMO_VERSION`` is replaced; any other existing ``root`` is an error.
    """
    root = Path(root).resolve()
    if _is_current(root):
        return root
    if root.exists():
        if not (root / _MARKER).is_file():
            raise FileExistsError(f"{root} exists and is not a demo directory; choose another path")
        stale = root.parent / f".{root.name}.stale-{os.getpid()}"
        try:
            os.rename(root, stale)
        except FileNotFoundError:  # another process moved it first
            pass
        else:
            shutil.rmtree(stale, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        write_demo_data(tmp, dataset_dir=str(root))
        try:
            os.rename(tmp, root)
        except OSError:
            if not _is_current(root):  # lost the race to a process that built the same thing: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m omni_fast.data.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="./data/demo", help="output directory (default ./data/demo)")
    parser.add_argument("--no-processor", action="store_true", help="skip the tiny tokenizer/processor directory")
    args = parser.parse_args(argv)
    out = write_demo_data(args.out, processor=not args.no_processor)
    print(f"demo data written to {out}; train on {out / DEMO_FILES['all']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
