"""Fused multimodal scatter: the face, its backends, the host-side count check and the custom op with its backward.

``multimodal_scatter`` writes the audio, image and video encoder outputs into the token embeddings at their
placeholder ids (each modality's rows in order of appearance, row-major over [B, S]) in one pass, where the
reference does one ``masked_scatter`` per modality. It is a copy: the result and the gradients are bit-equal.

Placeholder counts must equal the feature rows. They depend on the ids' values, which are known on the host
(``check_placeholder_counts`` on numpy, what the thinker's ``prepare_batch`` calls; and the face in PyNative) but
not while ``ms.jit`` compiles a graph. There the kernel checks them itself and fails the launch (a RuntimeError
from MindSpore) instead of reading out of bounds; the reference backend does not check.
"""

from __future__ import annotations

import functools

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from omni_fast.ops import dispatch
from omni_fast.ops.library import aot_op
from omni_fast.ops.reference import multimodal_scatter_reference

IMAGE_TOKEN_ID = 151655
VIDEO_TOKEN_ID = 151656
AUDIO_TOKEN_ID = 151646
ID_DTYPES = (ms.int32, ms.int64)


def check_placeholder_counts(
    input_ids: np.ndarray,
    *,
    image_rows: int | None = None,
    video_rows: int | None = None,
    audio_rows: int | None = None,
    image_token_id: int = IMAGE_TOKEN_ID,
    video_token_id: int = VIDEO_TOKEN_ID,
    audio_token_id: int = AUDIO_TOKEN_ID,
) -> None:
    """Each modality's placeholder count in ``input_ids`` must equal its feature rows (``None``: no features of
    that modality, so no placeholders). transformers silently drops extra features; we refuse and say where."""
    ids = np.asarray(input_ids)
    if ids.ndim < 1:
        raise ValueError(f"input_ids must have at least one axis, got shape {ids.shape}")
    ids = ids.reshape(int(np.prod(ids.shape[:-1])), ids.shape[-1])
    for name, token_id, rows in (
        ("audio", audio_token_id, audio_rows),
        ("image", image_token_id, image_rows),
        ("video", video_token_id, video_rows),
    ):
        per_row = (ids == token_id).sum(-1)
        count = int(per_row.sum())
        if count != (rows or 0):
            given = f"no {name} features were given" if rows is None else f"the {name} features have {rows} rows"
            raise ValueError(
                f"{name}: input_ids hold {count} placeholder tokens (id {token_id}; per row {per_row.tolist()}) "
                f"but {given}"
            )


def backend_reasons(dtype: ms.dtype) -> dict:
    """Why each backend cannot serve the scatter on embeddings of ``dtype`` (empty list = it can)."""

    def ascend() -> list[str]:
        # MindSpore has no fused op for this; on an NPU the masked_scatter composition (the reference) serves.
        return ["no native fused scatter in MindSpore: on Ascend the reference composition serves"]

    return {"ascend": ascend, "cpu_kernel": lambda: dispatch.cpu_kernel_reasons(dtype), "reference": lambda: []}


@functools.cache
def _kernel_op() -> ops.Custom:
    def shapes(d, ids, token_ids, audio, image, video):
        return d, audio, image, video

    backward = aot_op("MultimodalScatterBackward", shapes)

    def bprop(embeds, ids, token_ids, audio, image, video, out, dout):
        d_embeds, d_audio, d_image, d_video = backward(dout, ids, token_ids, audio, image, video)
        return d_embeds, ops.zeros_like(ids), ops.zeros_like(token_ids), d_audio, d_image, d_video

    def forward_shape(embeds, ids, token_ids, audio, image, video):
        return embeds

    return aot_op("MultimodalScatterForward", forward_shape, bprop)


def check_inputs(inputs_embeds: Tensor, input_ids: Tensor, features: tuple) -> None:
    """Shapes and dtypes (static, so this also runs while ms.jit compiles); ``features`` = (audio, image, video)."""
    if input_ids.dtype not in ID_DTYPES:
        raise ValueError(f"multimodal_scatter: input_ids dtype {input_ids.dtype} is not int32 or int64")
    if inputs_embeds.ndim < 1 or input_ids.shape != inputs_embeds.shape[:-1]:
        raise ValueError(
            f"multimodal_scatter: input_ids shape {input_ids.shape} must be inputs_embeds shape "
            f"{inputs_embeds.shape} without its last (hidden) axis"
        )
    hidden = inputs_embeds.shape[-1]
    for name, feats in zip(("audio", "image", "video"), features):
        if feats is None:
            continue
        if feats.ndim != 2 or feats.shape[1] != hidden:
            raise ValueError(
                f"multimodal_scatter: {name}_embeds shape {feats.shape} is not [rows, {hidden}] "
                "(the hidden size of inputs_embeds)"
            )
        if feats.dtype != inputs_embeds.dtype:
            raise ValueError(
                f"multimodal_scatter: {name}_embeds dtype {feats.dtype} differs from inputs_embeds dtype "
                f"{inputs_embeds.dtype}"
            )


class MultimodalScatter(nn.Cell):
    """The scatter for fixed placeholder ids; the backend is chosen once, for embeddings of ``dtype``."""

    def __init__(
        self,
        dtype: ms.dtype = ms.float32,
        *,
        image_token_id: int = IMAGE_TOKEN_ID,
        video_token_id: int = VIDEO_TOKEN_ID,
        audio_token_id: int = AUDIO_TOKEN_ID,
    ):
        super().__init__()
        # The reference's order (audio, image, video); any order gives the same result, the sets are disjoint.
        self.token_ids = (int(audio_token_id), int(image_token_id), int(video_token_id))
        if len(set(self.token_ids)) != 3:
            raise ValueError(
                f"multimodal_scatter: placeholder ids must be distinct, got image {image_token_id}, "
                f"video {video_token_id}, audio {audio_token_id}"
            )
        self.backend = dispatch.choose("multimodal_scatter", backend_reasons(dtype))
        self.token_ids_tensor = Tensor(np.array(self.token_ids, np.int64))
        self.kernel = _kernel_op() if self.backend == "cpu_kernel" else None

    def construct(
        self,
        inputs_embeds: Tensor,
        input_ids: Tensor,
        image_embeds: Tensor | None = None,
        video_embeds: Tensor | None = None,
        audio_embeds: Tensor | None = None,
    ) -> Tensor:
        features = (audio_embeds, image_embeds, video_embeds)
        check_inputs(inputs_embeds, input_ids, features)
        # True in PyNative, where the ids have values; False while ms.jit compiles (the kernel checks then).
        if ops.isconstant(input_ids):
            audio_id, image_id, video_id = self.token_ids
            check_placeholder_counts(
                input_ids.asnumpy(),
                image_rows=None if image_embeds is None else image_embeds.shape[0],
                video_rows=None if video_embeds is None else video_embeds.shape[0],
                audio_rows=None if audio_embeds is None else audio_embeds.shape[0],
                image_token_id=image_id,
                video_token_id=video_id,
                audio_token_id=audio_id,
            )
        if self.backend == "cpu_kernel":
            # An absent modality is an empty [0, H] tensor: one op signature, and its placeholders must be absent.
            empty = ops.zeros((0, inputs_embeds.shape[-1]), ms.float32).astype(inputs_embeds.dtype)
            audio, image, video = (empty if f is None else f for f in features)
            return self.kernel(inputs_embeds, input_ids, self.token_ids_tensor, audio, image, video)
        present = [(t, f) for t, f in zip(self.token_ids, features) if f is not None]
        return multimodal_scatter_reference(inputs_embeds, input_ids, present)


@functools.cache
def _cached(dtype: ms.dtype, image_token_id: int, video_token_id: int, audio_token_id: int) -> MultimodalScatter:
    return MultimodalScatter(
        dtype, image_token_id=image_token_id, video_token_id=video_token_id, audio_token_id=audio_token_id
    )


def multimodal_scatter(
    inputs_embeds: Tensor,
    input_ids: Tensor,
    *,
    image_embeds: Tensor | None = None,
    video_embeds: Tensor | None = None,
    audio_embeds: Tensor | None = None,
    image_token_id: int = IMAGE_TOKEN_ID,
    video_token_id: int = VIDEO_TOKEN_ID,
    audio_token_id: int = AUDIO_TOKEN_ID,
) -> Tensor:
    """``inputs_embeds`` [..., H] with the rows where ``input_ids`` [...] holds a modality's placeholder id replaced
    by that modality's features [rows, H], in order of appearance; differentiable in the embeddings and features.

    An absent modality (``None``) has no placeholders. Raises ValueError on a bad shape or dtype, and on a
    placeholder count that differs from the feature rows wherever the ids have values (PyNative).
    """
    return _cached(inputs_embeds.dtype, image_token_id, video_token_id, audio_token_id)(
        inputs_embeds, input_ids, image_embeds, video_embeds, audio_embeds
    )


def explain(dtype: ms.dtype = ms.float32) -> str:
    """Which backend would serve the scatter for ``dtype`` here, and why the others would not."""
    return dispatch.explain(backend_reasons(dtype))
