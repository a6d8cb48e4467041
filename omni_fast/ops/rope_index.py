"""Plain numpy reference of Qwen2.5-Omni's 3-D (t, h, w) rope index.

Bit-exact with transformers 4.53 ``Qwen2_5OmniPreTrainedModelForConditionalGeneration.get_rope_index`` (and its
``get_chunked_index``) on every well-formed input, written as segment arithmetic: one Python step per row and per
multimodal item, numpy for everything inside an item. This is the readable oracle for the compiled version,
``kernels/rope_index.h``; :func:`get_rope_index` (the public face, at the end) runs the same input checks, then that
kernel when ``omni_fast._C`` is built, else this reference.

Where transformers crashes (IndexError, empty ``max()``) or silently produces positions that do not line up with
the tokens (placeholder counts that disagree with grids / audio lengths, a missing end token), this raises
``ValueError`` naming the row and the token column instead.

transformers behaviours reproduced on purpose:

* Each block starts at ``max(previous block) + 1`` where "previous block" is the last *appended* block, not the
  running maximum. After an audio-in-video item that is the last interleaved chunk, so the end tokens may start
  below the video's largest h/w position.
* Video t offsets are ``long(float32(float32(k) * float32(second_per_grid)) * float32(position_id_per_seconds))``:
  float32 products, then truncation toward zero (e.g. second_per_grid 0.08, k 5 gives 9, not 10).
* ``get_chunked_index`` advances its chunk counter by at most one per token, so when a video's t step exceeds the
  chunk size (second_per_grid > 2 s) chunks are not value ranges: a t slice can be split across several chunks.
* The text-only fallback (no image and no video grids, also for audio-only batches) gives padding position 1 and
  computes the delta from a maximum that includes those pads (a row with < 2 tokens and some padding gets
  ``2 - n_tokens``, not ``0``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from omni_fast.ops import dispatch
from omni_fast.ops.library import KernelsUnavailable, host_module

__all__ = ["audio_token_count", "explain", "get_rope_index", "get_rope_index_reference"]

# Offsets at or above this are certainly a unit mistake (seconds vs frames); the float32 -> int64 truncation
# transformers does would also stop being meaningful long before int64 overflow.
_MAX_T_OFFSET = 2**31
# t offsets stay below _MAX_T_OFFSET and audio offsets below the row length, so every wider chunk is the same
# single chunk: clamping keeps tokens_per_chunk in int64 (for the compiled kernel) without changing any result.
_MAX_TOKENS_PER_CHUNK = 2**62


def audio_token_count(mel_frames: int | np.ndarray) -> int | np.ndarray:
    """LLM tokens for an audio of ``mel_frames`` mel frames (conv stride 2, then 2x average pooling)."""
    return ((mel_frames - 1) // 2 + 1 - 2) // 2 + 1


@dataclass(frozen=True)
class _Ids:
    image: int
    video: int
    audio: int
    vision_start: int
    audio_start: int


@dataclass
class _Inputs:
    """The flat per-batch media lists and how much of each has been consumed (transformers' global indices)."""

    image_grids: np.ndarray | None
    video_grids: np.ndarray | None
    second_per_grids: np.ndarray | None
    audio_seqlens: np.ndarray | None
    image_idx: int = 0
    video_idx: int = 0
    audio_idx: int = 0


@dataclass(frozen=True)
class _Item:
    """One multimodal block of a row; indices are into the row's attended tokens."""

    kind: str  # "image" | "video" | "audio" | "av"
    bos: int  # first bos token (vision_bos, or audio_bos for a plain audio)
    end: int  # one past the last end token
    grid: tuple[int, int, int] = (0, 0, 0)
    second_per_grid: np.float32 = np.float32(0.0)
    audio_len: int = 0


def _as_int_array(x, name: str, ndim: int) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if a.size and not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
        raise ValueError(f"{name} must hold integers, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.int64)  # no copy when it already is (the compiled kernel's input)


def _as_grids(x, name: str) -> np.ndarray | None:
    if x is None:
        return None
    a = np.asarray(x)
    if a.size == 0:
        return np.zeros((0, 3), np.int64)
    a = _as_int_array(a, name, 2)
    if a.shape[1] != 3:
        raise ValueError(f"{name} must have shape (n, 3), got {a.shape}")
    return a


def _run_end(false_idx: np.ndarray, start: int, n: int) -> int:
    """One past the end of the run of True flags starting at ``start`` (flags given by their False positions)."""
    k = np.searchsorted(false_idx, start)
    return int(false_idx[k]) if k < false_idx.size else n


def _chunk_ids(values: np.ndarray, tokens_per_chunk: int) -> np.ndarray:
    """Chunk number of each token, exactly as transformers' ``get_chunked_index`` splits a non-decreasing list.

    Its loop keeps a counter ``c`` (starting at 1) and, per token, opens a new chunk and increments ``c`` once if
    ``value >= c * tokens_per_chunk``. So ``c_i = min(c_{i-1} + 1, value_i // tokens_per_chunk + 1)``; unrolled,
    ``c_i = i + min(2, min_{j <= i}(target_j - j))`` — a running minimum instead of a per-token loop.
    """
    i = np.arange(values.size, dtype=np.int64)
    target = values // tokens_per_chunk + 1
    c = i + np.minimum(np.minimum.accumulate(target - i), 2)
    return c - 1


def _vision_positions(start: int, t_index: np.ndarray, grid_h: int, grid_w: int) -> np.ndarray:
    """(3, t*gh*gw) positions in raster order (t, h, w) over the merged grid, offset by ``start``."""
    n_t, per_t = t_index.size, grid_h * grid_w
    t = np.repeat(t_index, per_t)
    h = np.tile(np.repeat(np.arange(grid_h, dtype=np.int64), grid_w), n_t)
    w = np.tile(np.arange(grid_w, dtype=np.int64), n_t * grid_h)
    return np.stack([t, h, w]) + start


def _image_t_index(grid_t: int, position_id_per_seconds) -> np.ndarray:
    # transformers: (torch.arange(grid_t) * 1 * position_id_per_seconds).long() -- int64 for an int rate,
    # float32 then truncation for a float one.
    k = np.arange(grid_t, dtype=np.int64)
    if isinstance(position_id_per_seconds, (int, np.integer)):
        return k * int(position_id_per_seconds)
    return (k.astype(np.float32) * np.float32(position_id_per_seconds)).astype(np.int64)


def _video_t_index(grid_t: int, second_per_grid: np.float32, position_id_per_seconds) -> np.ndarray:
    # transformers: (torch.arange(grid_t) * second_per_grids[i].float() * position_id_per_seconds).long().
    # Two separately rounded float32 products, then truncation toward zero.
    t = np.arange(grid_t).astype(np.float32) * np.float32(second_per_grid)
    t = t * np.float32(position_id_per_seconds)
    return t.astype(np.int64)


def _parse_row(
    tok: np.ndarray, cols: np.ndarray, row: int, ids: _Ids, media: _Inputs, use_audio_in_video: bool, merge: int
) -> list[_Item]:
    """Find the row's multimodal blocks, check them against the grids / audio lengths and consume those."""
    n = tok.size

    def at(i: int) -> str:
        return f"row {row}, token {int(cols[i])}"

    is_image, is_video, is_audio = tok == ids.image, tok == ids.video, tok == ids.audio
    is_placeholder = is_image | is_video | is_audio
    not_image = np.flatnonzero(~is_image)
    not_video = np.flatnonzero(~is_video)
    not_audio = np.flatnonzero(~is_audio)
    not_av = np.flatnonzero(~(is_video | is_audio))

    vbos = np.flatnonzero(tok == ids.vision_start)
    if vbos.size and vbos[-1] == n - 1:
        raise ValueError(f"{at(n - 1)}: <|vision_bos|> is the last token, nothing follows it")
    after = tok[vbos + 1]
    images, videos, avs = vbos[after == ids.image], vbos[after == ids.video], vbos[after == ids.audio_start]
    if avs.size and not use_audio_in_video:
        raise ValueError(
            f"{at(int(avs[0]))}: <|vision_bos|><|audio_bos|> (an audio-in-video block) needs use_audio_in_video=True"
        )
    if videos.size and use_audio_in_video:
        raise ValueError(
            f"{at(int(videos[0]))}: a video without interleaved audio while use_audio_in_video=True "
            "(transformers applies it to every video of the batch)"
        )
    abos = np.flatnonzero(tok == ids.audio_start)
    audios = np.setdiff1d(abos, avs + 1)  # the audio_bos of an audio-in-video block belongs to that block
    if audios.size and audios[-1] == n - 1:
        raise ValueError(f"{at(n - 1)}: <|audio_bos|> is the last token, nothing follows it")

    starts = np.concatenate([images, videos, audios, avs])
    kinds = np.repeat(np.array(["image", "video", "audio", "av"]), [images.size, videos.size, audios.size, avs.size])
    order = np.argsort(starts, kind="stable")

    covered = np.zeros(n, dtype=bool)
    items: list[_Item] = []
    st = 0  # first token not yet assigned to a block
    for bos, kind in zip(starts[order].tolist(), kinds[order].tolist()):
        if bos < st:
            raise ValueError(f"{at(bos)}: {kind} block starts inside the previous block (missing end token?)")
        spg = np.float32(0.0)
        audio_len = 0
        grid = (0, 0, 0)
        if kind in ("image", "video", "av"):
            grids = media.image_grids if kind == "image" else media.video_grids
            idx = media.image_idx if kind == "image" else media.video_idx
            name = "image_grid_thw" if kind == "image" else "video_grid_thw"
            if grids is None or idx >= grids.shape[0]:
                have = 0 if grids is None else grids.shape[0]
                raise ValueError(f"{at(bos)}: {kind} #{idx} of the batch has no {name} row (only {have} given)")
            grid = tuple(int(v) for v in grids[idx])
            t, h, w = grid
            if t < 1 or h < 1 or w < 1 or h % merge or w % merge:
                raise ValueError(
                    f"{at(bos)}: {name}[{idx}] = {grid} must be positive with h and w divisible by "
                    f"spatial_merge_size={merge}"
                )
            if kind == "image":
                media.image_idx += 1
            else:
                media.video_idx += 1
                if media.second_per_grids is None or idx >= media.second_per_grids.size:
                    have = 0 if media.second_per_grids is None else media.second_per_grids.size
                    raise ValueError(
                        f"{at(bos)}: video #{idx} of the batch has no second_per_grids entry (only {have} given)"
                    )
                spg = media.second_per_grids[idx]
                if not np.isfinite(spg) or spg < 0:
                    raise ValueError(f"{at(bos)}: second_per_grids[{idx}] = {spg} must be finite and >= 0")
        if kind in ("audio", "av"):
            idx = media.audio_idx
            if media.audio_seqlens is None or idx >= media.audio_seqlens.size:
                have = 0 if media.audio_seqlens is None else media.audio_seqlens.size
                raise ValueError(f"{at(bos)}: audio #{idx} of the batch has no audio_seqlens entry (only {have} given)")
            mel = int(media.audio_seqlens[idx])
            audio_len = audio_token_count(mel)
            if audio_len < 1:
                # transformers takes max() of the empty audio block and crashes
                raise ValueError(f"{at(bos)}: audio_seqlens[{idx}] = {mel} mel frames give no audio token (need >= 3)")
            media.audio_idx += 1
        vision_len = grid[0] * grid[1] * grid[2] // (merge * merge)

        if kind == "av":
            first = bos + 2
            run_end = _run_end(not_av, first, n)
            if run_end - first != vision_len + audio_len:
                raise ValueError(
                    f"{at(bos)}: audio-in-video block needs {vision_len} <|VIDEO|> + {audio_len} "
                    f"<|AUDIO|> tokens (grid {grid}, {mel} mel frames), found {run_end - first}"
                )
            n_video = int(is_video[first:run_end].sum())
            if n_video != vision_len:
                raise ValueError(
                    f"{at(bos)}: audio-in-video block needs {vision_len} <|VIDEO|> tokens (grid {grid}), "
                    f"found {n_video} (and {run_end - first - n_video} <|AUDIO|>)"
                )
            if not is_video[first]:  # the run holds >= 1 video token, so first < n
                # transformers finds the block by its first <|VIDEO|>; an <|AUDIO|> first would be read as an audio
                raise ValueError(f"{at(first)}: an audio-in-video block must start with a <|VIDEO|> chunk")
            n_end = 2
        else:
            first = bos + 1
            flags_false = {"image": not_image, "video": not_video, "audio": not_audio}[kind]
            need = audio_len if kind == "audio" else vision_len
            run_end = _run_end(flags_false, first, n)
            if run_end - first != need:
                token = {"image": "<|IMAGE|>", "video": "<|VIDEO|>", "audio": "<|AUDIO|>"}[kind]
                source = f"{mel} mel frames" if kind == "audio" else f"grid {grid}"
                raise ValueError(f"{at(bos)}: {kind} needs {need} {token} tokens ({source}), found {run_end - first}")
            n_end = 1
        end = run_end + n_end
        if end > n:
            raise ValueError(f"{at(bos)}: {kind} block is cut off, its end token(s) are missing")
        for e in range(run_end, end):
            if is_placeholder[e]:
                raise ValueError(
                    f"{at(e)}: expected an end token after the {kind} block, found placeholder {int(tok[e])}"
                )
        covered[first:run_end] = True
        items.append(_Item(kind, bos, end, grid, spg, audio_len))
        st = end

    stray = np.flatnonzero(is_placeholder & ~covered)
    if stray.size:
        raise ValueError(
            f"{at(int(stray[0]))}: placeholder token {int(tok[stray[0]])} outside any "
            "<|vision_bos|>/<|audio_bos|> block (or more placeholders than bos tokens)"
        )
    return items


def _row_positions(
    n: int, items: list[_Item], merge: int, position_id_per_seconds, tokens_per_chunk: int, row: int
) -> np.ndarray:
    """(3, n) positions of one row's attended tokens (transformers' per-row loop, block by block)."""
    blocks: list[np.ndarray] = []
    cur = 0  # transformers' st_idx: max of the last appended block + 1

    def push(block: np.ndarray) -> None:
        nonlocal cur
        blocks.append(block)
        cur = int(block.max()) + 1

    def line(start: int, length: int) -> np.ndarray:
        return np.broadcast_to(start + np.arange(length, dtype=np.int64), (3, length))

    st = 0
    for it in items:
        if it.bos > st:  # transformers skips empty text runs (an empty block would break its max())
            push(line(cur, it.bos - st))
        if it.kind == "audio":
            push(line(cur, 1))
            push(line(cur, it.audio_len))
            push(line(cur, 1))
            st = it.end
            continue
        t, h, w = it.grid
        if it.kind == "image":
            t_index = _image_t_index(t, position_id_per_seconds)
        else:
            t_index = _video_t_index(t, it.second_per_grid, position_id_per_seconds)
            if t_index.size and not (0 <= t_index[-1] < _MAX_T_OFFSET):
                raise ValueError(
                    f"row {row}: video t offset {int(t_index[-1])} out of range "
                    f"(second_per_grid {it.second_per_grid}, {t} temporal patches)"
                )
        if it.kind in ("image", "video"):
            push(line(cur, 1))
            push(_vision_positions(cur, t_index, h // merge, w // merge))
            push(line(cur, 1))
            st = it.end
            continue
        # audio in video: both bos tokens share one position, audio and video share one time axis from there
        bos_pos = line(cur, 1)
        blocks += [bos_pos, bos_pos]
        base = cur + 1
        video = _vision_positions(base, t_index, h // merge, w // merge)
        audio = line(base, it.audio_len)
        # chunk by value relative to the block start, then emit video chunk 0, audio chunk 0, video chunk 1, ...
        key = np.concatenate(
            [2 * _chunk_ids(video[0] - base, tokens_per_chunk), 2 * _chunk_ids(audio[0] - base, tokens_per_chunk) + 1]
        )
        order = np.argsort(key, kind="stable")
        merged = np.concatenate([video, audio], axis=1)
        blocks.append(merged[:, order])
        # the end tokens start after the last *appended* chunk, not after the whole block's maximum
        cur = int(merged[:, key == key[order[-1]]].max()) + 1
        eos_pos = line(cur, 1)
        blocks += [eos_pos, eos_pos]
        cur += 1
        st = it.end
    if st < n:
        push(line(cur, n - st))
    return np.concatenate(blocks, axis=1)


def get_rope_index_reference(
    input_ids,
    image_grid_thw=None,
    video_grid_thw=None,
    attention_mask=None,
    use_audio_in_video: bool = False,
    audio_seqlens=None,
    second_per_grids=None,
    *,
    spatial_merge_size: int = 2,
    image_token_id: int = 151655,
    video_token_id: int = 151656,
    audio_token_id: int = 151646,
    vision_start_token_id: int = 151652,
    audio_start_token_id: int = 151647,
    position_id_per_seconds: int = 25,
    seconds_per_chunk: float = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """numpy in, (position_ids int64 [3, B, L], mrope_position_deltas int64 [B, 1]) out — same meaning as transformers.

    ``input_ids`` [B, L]; ``attention_mask`` [B, L] of 0/1 (None: all ones); ``image_grid_thw`` / ``video_grid_thw``
    [n, 3] grids in patches and ``second_per_grids`` [n_videos] seconds per temporal patch, flat over the batch in
    order of appearance; ``audio_seqlens`` [n_audios] mel-frame counts (``feature_attention_mask.sum(1)``), flat in
    order of appearance of plain audios and audio-in-video blocks alike. Padding positions are 1. The deltas are
    ``max position + 1 - attended tokens`` per row.

    The multimodal path is taken iff a grid array is given (even an empty one); otherwise the text-only fallback
    (cumsum of the mask) — also for audio-only batches, like transformers. Both paths validate the token layout.
    """
    checked = _check_inputs(
        input_ids,
        image_grid_thw,
        video_grid_thw,
        attention_mask,
        audio_seqlens,
        second_per_grids,
        spatial_merge_size,
        position_id_per_seconds,
        seconds_per_chunk,
    )
    tok_ids = _Ids(image_token_id, video_token_id, audio_token_id, vision_start_token_id, audio_start_token_id)
    return _reference(checked, bool(use_audio_in_video), tok_ids, position_id_per_seconds)


@dataclass(frozen=True)
class _Checked:
    """The inputs after the boundary checks both implementations share: C-contiguous int64 / float32 arrays."""

    ids: np.ndarray  # [B, L]
    mask: np.ndarray | None  # [B, L], None: all ones; its values are checked (0/1) by each implementation
    image_grids: np.ndarray | None
    video_grids: np.ndarray | None
    second_per_grids: np.ndarray | None  # float32, as transformers uses them
    audio_seqlens: np.ndarray | None
    merge: int
    tokens_per_chunk: int


def _check_inputs(
    input_ids,
    image_grid_thw,
    video_grid_thw,
    attention_mask,
    audio_seqlens,
    second_per_grids,
    spatial_merge_size,
    position_id_per_seconds,
    seconds_per_chunk,
) -> _Checked:
    ids = _as_int_array(input_ids, "input_ids", 2)
    if ids.size == 0:
        raise ValueError(f"input_ids must be non-empty, got shape {ids.shape}")
    mask = None
    if attention_mask is not None:
        mask = _as_int_array(attention_mask, "attention_mask", 2)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    merge = int(spatial_merge_size)
    if merge < 1:
        raise ValueError(f"spatial_merge_size must be >= 1, got {spatial_merge_size}")
    rate = position_id_per_seconds
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer, np.floating)) or not 0 < rate < 2**31:
        raise ValueError(f"position_id_per_seconds must be a number in (0, 2**31), got {rate!r}")
    if isinstance(seconds_per_chunk, bool) or not isinstance(seconds_per_chunk, (int, float, np.integer, np.floating)):
        raise ValueError(f"seconds_per_chunk must be a number, got {seconds_per_chunk!r}")
    if not np.isfinite(seconds_per_chunk):
        raise ValueError(f"seconds_per_chunk must be finite, got {seconds_per_chunk}")
    tokens_per_chunk = int(position_id_per_seconds * seconds_per_chunk)
    if tokens_per_chunk < 1:
        raise ValueError(f"position_id_per_seconds * seconds_per_chunk must be >= 1, got {tokens_per_chunk}")

    spg = None
    if second_per_grids is not None:
        spg = np.asarray(second_per_grids, dtype=np.float64).reshape(-1).astype(np.float32)  # transformers: .float()
    seqlens = None
    if audio_seqlens is not None:
        seqlens = _as_int_array(np.asarray(audio_seqlens).reshape(-1), "audio_seqlens", 1)
    return _Checked(
        ids,
        mask,
        _as_grids(image_grid_thw, "image_grid_thw"),
        _as_grids(video_grid_thw, "video_grid_thw"),
        spg,
        seqlens,
        merge,
        min(tokens_per_chunk, _MAX_TOKENS_PER_CHUNK),
    )


def _reference(
    checked: _Checked, use_audio_in_video: bool, tok_ids: _Ids, position_id_per_seconds
) -> tuple[np.ndarray, np.ndarray]:
    ids, merge, tokens_per_chunk = checked.ids, checked.merge, checked.tokens_per_chunk
    batch, length = ids.shape
    if checked.mask is None:
        mask = np.ones_like(ids, dtype=bool)
    else:
        if not np.isin(checked.mask, (0, 1)).all():
            raise ValueError("attention_mask must hold only 0 and 1")
        mask = checked.mask.astype(bool)
    media = _Inputs(checked.image_grids, checked.video_grids, checked.second_per_grids, checked.audio_seqlens)

    multimodal = media.image_grids is not None or media.video_grids is not None
    rows = []
    for b in range(batch):
        cols = np.flatnonzero(mask[b])
        if multimodal and cols.size == 0:
            raise ValueError(f"row {b} has no attended tokens (transformers cannot index an empty row)")
        tok = ids[b, cols]
        rows.append((cols, _parse_row(tok, cols, b, tok_ids, media, use_audio_in_video, merge)))
    for name, used, arr in (
        ("image_grid_thw", media.image_idx, media.image_grids),
        ("video_grid_thw", media.video_idx, media.video_grids),
        ("audio_seqlens", media.audio_idx, media.audio_seqlens),
    ):
        if arr is not None and arr.shape[0] > used:
            raise ValueError(f"{name} has {arr.shape[0]} entries but the batch has only {used} such placeholders")

    if not multimodal:
        # text-only fallback, as transformers: cumsum of the mask, pads at 1, delta from the max *including* pads
        m = mask.astype(np.int64)
        pos = np.cumsum(m, axis=1) - 1
        pos[~mask] = 1
        deltas = pos.max(axis=1, keepdims=True) + 1 - m.sum(axis=1, keepdims=True)
        return np.ascontiguousarray(np.broadcast_to(pos, (3, batch, length))), deltas

    position_ids = np.ones((3, batch, length), dtype=np.int64)
    deltas = np.zeros((batch, 1), dtype=np.int64)
    for b, (cols, items) in enumerate(rows):
        pos = _row_positions(cols.size, items, merge, position_id_per_seconds, tokens_per_chunk, b)
        position_ids[:, b, cols] = pos
        deltas[b, 0] = pos.max() + 1 - cols.size
    return position_ids, deltas


# ---------------------------------------------------------------------------------------------- the face


def backend_reasons() -> dict:
    """Why each backend cannot compute the rope index here (empty list = it can). A host op: it runs on the host
    whatever the device, so the compiled module is all the ``cpu_kernel`` backend needs."""

    def cpu_kernel() -> list[str]:
        try:
            host_module()
        except KernelsUnavailable as err:
            return [str(err)]
        return []

    return {
        "ascend": lambda: ["a host op (numpy in, numpy out): there is no device kernel to call"],
        "cpu_kernel": cpu_kernel,
        "reference": lambda: [],
    }


def explain() -> str:
    """Which implementation ``get_rope_index`` would use here, and why the others would not."""
    return dispatch.explain(backend_reasons())


def get_rope_index(
    input_ids,
    image_grid_thw=None,
    video_grid_thw=None,
    attention_mask=None,
    use_audio_in_video: bool = False,
    audio_seqlens=None,
    second_per_grids=None,
    *,
    spatial_merge_size: int = 2,
    image_token_id: int = 151655,
    video_token_id: int = 151656,
    audio_token_id: int = 151646,
    vision_start_token_id: int = 151652,
    audio_start_token_id: int = 151647,
    position_id_per_seconds: int = 25,
    seconds_per_chunk: float = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2.5-Omni 3-D rope index: ``(position_ids int64 [3, B, L], mrope_position_deltas int64 [B, 1])``.

    Same arguments, results and errors as :func:`get_rope_index_reference` (whose docstring describes them), computed
    by the compiled kernel ``kernels/rope_index.h`` when ``omni_fast._C`` is built (rows in parallel, no Python
    per item), else by that reference; ``OMNI_FAST_BACKEND=reference`` forces the reference. Malformed input raises
    ``ValueError`` naming the row and the token column.
    """
    checked = _check_inputs(
        input_ids,
        image_grid_thw,
        video_grid_thw,
        attention_mask,
        audio_seqlens,
        second_per_grids,
        spatial_merge_size,
        position_id_per_seconds,
        seconds_per_chunk,
    )
    if dispatch.choose("rope_index", backend_reasons()) == "reference":
        tok_ids = _Ids(image_token_id, video_token_id, audio_token_id, vision_start_token_id, audio_start_token_id)
        return _reference(checked, bool(use_audio_in_video), tok_ids, position_id_per_seconds)
    return host_module().rope_index(
        checked.ids,
        checked.mask,
        checked.image_grids,
        checked.video_grids,
        checked.second_per_grids,
        checked.audio_seqlens,
        bool(use_audio_in_video),
        checked.merge,
        float(position_id_per_seconds),
        isinstance(position_id_per_seconds, (int, np.integer)),
        checked.tokens_per_chunk,
        image_token_id,
        video_token_id,
        audio_token_id,
        vision_start_token_id,
        audio_start_token_id,
    )
