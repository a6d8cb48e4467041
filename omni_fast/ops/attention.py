"""Fused (flash) attention: the face, its backends and the MindSpore custom op with its backward.

``flash_attention(query, key, value, head_num, *, input_layout, actual_seq_qlen, actual_seq_kvlen, attn_mask,
scalar_value, sparse_mode, pre_tokens, next_tokens)`` has the meaning of ``mindspore.ops.flash_attention_score``
for layouts BNSD, BSND, BSH and TND and sparse modes 0 (no mask, or a bool mask with True = masked out, plus the
pre/next_tokens band), 2 (causal, top-left) and 3 (causal, bottom-right); GQA when the key/value heads divide
the query heads; ``scalar_value`` defaults to 1/sqrt(head_dim). A query row that may see no key gives 0.

Backends (``omni_fast.ops.dispatch``): ``ascend`` calls ``ops.flash_attention_score`` with the same arguments
(it has never run here: no NPU in this project's CI; see the README), ``cpu_kernel`` is ``kernels/attention.h``
through ``ops.Custom(func_type="aot")`` with a ``bprop``, ``reference`` is the composed
``omni_fast.ops.reference.flash_attention_reference``.

Under ``ms.jit`` build a :class:`FlashAttention` cell once (like the model's layers do) and pass the cumulative
segment ends of TND as int64 tensors: their values then change per batch without recompiling (only a change of
their length, i.e. of the segment count, re-specialises the graph, as any shape change does).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from omni_fast.ops import dispatch
from omni_fast.ops.library import aot_entry, aot_op
from omni_fast.ops.reference import flash_attention_reference

LAYOUTS = ("BNSD", "BSND", "BSH", "TND")
_LAYOUT_CODES = {"BNSD": 0, "BSND": 1, "TND": 2, "BSH": 3}  # AttnInputLayout in kernels/attention.h
SPARSE_MODES = (0, 2, 3)
ASCEND_DTYPES = (ms.float16, ms.bfloat16)
NO_BAND = 2147483647
# Ascend takes causal masks (sparse_mode 2/3) as a compressed 2048 x 2048 upper-triangular bool mask.
_ASCEND_CAUSAL_SIDE = 2048


def backend_reasons(dtype: ms.dtype, head_dim: int | None = None) -> dict:
    """Why each backend cannot serve attention on inputs of ``dtype`` (empty list = it can)."""

    def ascend() -> list[str]:
        why = dispatch.needs_device("Ascend")
        if dtype not in ASCEND_DTYPES:
            why.append(f"flash_attention_score takes float16/bfloat16, not {dtype}")
        if head_dim is not None and (head_dim % 16 or head_dim > 512):
            why.append(f"flash_attention_score needs head_dim a multiple of 16 up to 512, got {head_dim}")
        return why

    return {"ascend": ascend, "cpu_kernel": lambda: dispatch.cpu_kernel_reasons(dtype), "reference": lambda: []}


def explain(dtype: ms.dtype = ms.float32, head_dim: int | None = None) -> str:
    """Which backend would serve attention for ``dtype`` here, and why the others would not."""
    return dispatch.explain(backend_reasons(dtype, head_dim))


def _check_static(head_num: int, input_layout: str, sparse_mode: int, pre_tokens: int, next_tokens: int) -> None:
    if input_layout not in LAYOUTS:
        raise ValueError(f"flash_attention: input_layout {input_layout!r} is not one of {', '.join(LAYOUTS)}")
    if sparse_mode not in SPARSE_MODES:
        raise ValueError(
            f"flash_attention: sparse_mode {sparse_mode} is not supported (0 = no mask or attn_mask, "
            "2 = causal top-left, 3 = causal bottom-right)"
        )
    if not isinstance(head_num, int) or head_num < 1:
        raise ValueError(f"flash_attention: head_num must be a positive int, got {head_num!r}")
    if sparse_mode == 0 and pre_tokens < 0 and next_tokens < 0:
        raise ValueError(f"flash_attention: pre_tokens {pre_tokens} and next_tokens {next_tokens} leave no band")


@functools.cache
def _kernel_ops(layout_code: int, head_num: int) -> ops.Custom:
    def lse_shape(q):
        if layout_code == _LAYOUT_CODES["BSH"]:
            return [q[0], q[1], head_num]
        return list(q[:-1])

    backward = aot_op("FlashAttentionBackward", lambda do, q, k, v, o, lse, cq, ckv, m, meta, s: (q, k, v))

    def bprop(q, k, v, cu_q, cu_kv, mask, meta, scale, out, dout):
        dq, dk, dv = backward(dout[0], q, k, v, out[0], out[1], cu_q, cu_kv, mask, meta, scale)
        zeros = (ops.zeros_like(cu_q), ops.zeros_like(cu_kv), ops.zeros_like(mask), ops.zeros_like(meta))
        return (dq, dk, dv, *zeros, ops.zeros_like(scale))

    return ops.Custom(
        aot_entry("FlashAttentionForward"),
        out_shape=lambda q, k, v, cq, ckv, m, meta, s: (q, lse_shape(q)),
        out_dtype=lambda q, k, v, cq, ckv, m, meta, s: (q, ms.float32),
        func_type="aot",
        bprop=bprop,
    )


class FlashAttention(nn.Cell):
    """``flash_attention`` with its static arguments fixed; the backend is chosen once, for inputs of ``dtype``.

    ``construct(query, key, value, actual_seq_qlen=None, actual_seq_kvlen=None, attn_mask=None)``: the cumulative
    ends are int64 tensors (TND only), ``attn_mask`` a bool tensor (sparse_mode 0, not TND). ``scale`` must be
    given (the function face derives the default from the head dim).
    """

    def __init__(
        self,
        head_num: int,
        scale: float,
        input_layout: str = "BNSD",
        sparse_mode: int = 0,
        pre_tokens: int = NO_BAND,
        next_tokens: int = NO_BAND,
        dtype: ms.dtype = ms.float32,
        head_dim: int | None = None,
    ):
        super().__init__()
        _check_static(head_num, input_layout, sparse_mode, pre_tokens, next_tokens)
        self.head_num = head_num
        self.scale = float(scale)
        self.input_layout = input_layout
        self.sparse_mode = sparse_mode
        self.pre_tokens = int(pre_tokens)
        self.next_tokens = int(next_tokens)
        self.backend = dispatch.choose("flash_attention", backend_reasons(dtype, head_dim))
        if self.backend == "cpu_kernel":
            self.kernel = _kernel_ops(_LAYOUT_CODES[input_layout], head_num)
            code, tnd = _LAYOUT_CODES[input_layout], int(input_layout == "TND")
            # meta = [layout, head_num, sparse_mode, pre_tokens, next_tokens, has_mask, has_cu]
            base = [code, head_num, sparse_mode, self.pre_tokens, self.next_tokens]
            self.meta_plain = Tensor(np.array([*base, 0, tnd], dtype=np.int64))
            self.meta_masked = Tensor(np.array([*base, 1, tnd], dtype=np.int64))
            self.scale_tensor = Tensor(np.array([scale], dtype=np.float32))
            self.no_cu = Tensor(np.zeros(1, dtype=np.int64))  # placeholders: aot ops take tensors only
            self.no_mask = Tensor(np.zeros(1, dtype=np.bool_))
        if self.backend == "ascend":
            self.causal_mask = Tensor(np.triu(np.ones((_ASCEND_CAUSAL_SIDE,) * 2, dtype=np.bool_), 1))

    def construct(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        actual_seq_qlen: Tensor | None = None,
        actual_seq_kvlen: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        if self.backend == "cpu_kernel":
            cu_q = self.no_cu if actual_seq_qlen is None else actual_seq_qlen
            cu_kv = self.no_cu if actual_seq_kvlen is None else actual_seq_kvlen
            if attn_mask is None:
                return self.kernel(query, key, value, cu_q, cu_kv, self.no_mask, self.meta_plain, self.scale_tensor)[0]
            mask = attn_mask.astype(ms.bool_)
            return self.kernel(query, key, value, cu_q, cu_kv, mask, self.meta_masked, self.scale_tensor)[0]
        if self.backend == "ascend":  # never run in this project (no NPU): MindSpore's fused op, same arguments
            mask = self.causal_mask if self.sparse_mode in (2, 3) else attn_mask
            return ops.flash_attention_score(
                query,
                key,
                value,
                self.head_num,
                attn_mask=mask,
                actual_seq_qlen=actual_seq_qlen,
                actual_seq_kvlen=actual_seq_kvlen,
                scalar_value=self.scale,
                pre_tokens=self.pre_tokens,
                next_tokens=self.next_tokens,
                input_layout=self.input_layout,
                sparse_mode=self.sparse_mode,
            )
        return flash_attention_reference(
            query,
            key,
            value,
            self.head_num,
            self.input_layout,
            actual_seq_qlen,
            actual_seq_kvlen,
            attn_mask,
            self.scale,
            self.sparse_mode,
            self.pre_tokens,
            self.next_tokens,
        )


def _heads_and_dim(shape: tuple, layout: str, head_num: int, what: str) -> tuple[int, int, int]:
    """(heads, sequence length, head_dim) of a query-like (``head_num`` given) or key-like tensor."""
    want = 3 if layout in ("BSH", "TND") else 4
    if len(shape) != want:
        raise ValueError(f"flash_attention: {what} has shape {shape}, expected {want} dimensions for {layout}")
    if layout == "BNSD":
        return shape[1], shape[2], shape[3]
    if layout == "BSND":
        return shape[2], shape[1], shape[3]
    if layout == "TND":
        return shape[1], shape[0], shape[2]
    if shape[2] % head_num:
        raise ValueError(f"flash_attention: {what} hidden size {shape[2]} is not a multiple of {head_num} heads")
    return head_num, shape[1], shape[2] // head_num


def _cumulative_ends(value, total: int, name: str) -> tuple[Tensor, int]:
    """Cumulative ends as an int64 tensor, and the segment count; Python/numpy values are checked here."""
    if isinstance(value, Tensor):
        if value.ndim != 1 or value.dtype not in (ms.int64, ms.int32):
            raise ValueError(f"flash_attention: {name} must be a 1-D int tensor, got {value.dtype} {value.shape}")
        return value.astype(ms.int64), value.shape[0]
    ends = np.asarray(value)
    if ends.ndim != 1 or ends.size == 0 or not np.issubdtype(ends.dtype, np.integer):
        raise ValueError(f"flash_attention: {name} must be a non-empty 1-D list of ints, got {value!r}")
    if (np.diff(ends, prepend=0) < 0).any():
        raise ValueError(f"flash_attention: {name} must be non-decreasing cumulative ends from >= 0, got {ends}")
    if ends[-1] != total:
        raise ValueError(f"flash_attention: {name} ends at {ends[-1]}, but the tensor has {total} tokens")
    return Tensor(ends.astype(np.int64)), ends.size


@functools.cache
def _cached(head_num, scale, layout, sparse_mode, pre_tokens, next_tokens, dtype, head_dim) -> FlashAttention:
    return FlashAttention(head_num, scale, layout, sparse_mode, pre_tokens, next_tokens, dtype, head_dim)


def flash_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    head_num: int,
    *,
    input_layout: str = "BNSD",
    actual_seq_qlen: Sequence[int] | np.ndarray | Tensor | None = None,
    actual_seq_kvlen: Sequence[int] | np.ndarray | Tensor | None = None,
    attn_mask: Tensor | None = None,
    scalar_value: float | None = None,
    sparse_mode: int = 0,
    pre_tokens: int = NO_BAND,
    next_tokens: int = NO_BAND,
) -> Tensor:
    """softmax(scalar_value * Q K^T, masked) V with the meaning of ``mindspore.ops.flash_attention_score``.

    Differentiable in query, key and value. Raises ``ValueError`` for inputs no backend can serve.
    """
    _check_static(head_num, input_layout, sparse_mode, pre_tokens, next_tokens)
    nq, sq, d = _heads_and_dim(query.shape, input_layout, head_num, "query")
    if nq != head_num:
        raise ValueError(f"flash_attention: query has {nq} heads but head_num is {head_num}")
    kv_heads = key.shape[-1] // d if input_layout == "BSH" else None
    nk, skv, dk = _heads_and_dim(key.shape, input_layout, kv_heads or 1, "key")
    if key.shape != value.shape:
        raise ValueError(f"flash_attention: key shape {key.shape} differs from value shape {value.shape}")
    if dk != d or (input_layout == "BSH" and key.shape[-1] % d):
        raise ValueError(f"flash_attention: key head_dim {key.shape[-1]} does not match query head_dim {d}")
    if input_layout != "TND" and key.shape[0] != query.shape[0]:
        raise ValueError(f"flash_attention: key batch {key.shape[0]} differs from query batch {query.shape[0]}")
    if nq % nk:
        raise ValueError(f"flash_attention: {nk} key/value heads do not divide {nq} query heads (GQA needs that)")
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"flash_attention: dtypes differ: query {query.dtype}, key {key.dtype}, value {value.dtype}")
    cu_q = cu_kv = None
    if input_layout == "TND":
        if actual_seq_qlen is None or actual_seq_kvlen is None:
            raise ValueError("flash_attention: TND needs actual_seq_qlen and actual_seq_kvlen (cumulative ends)")
        if attn_mask is not None:
            raise ValueError("flash_attention: TND takes no attn_mask; use sparse_mode 2/3 or segments")
        cu_q, n_q = _cumulative_ends(actual_seq_qlen, sq, "actual_seq_qlen")
        cu_kv, n_kv = _cumulative_ends(actual_seq_kvlen, skv, "actual_seq_kvlen")
        if n_q != n_kv:
            raise ValueError(f"flash_attention: actual_seq_qlen has {n_q} segments, actual_seq_kvlen {n_kv}")
    elif actual_seq_qlen is not None or actual_seq_kvlen is not None:
        raise ValueError(f"flash_attention: actual_seq_qlen/kvlen are for TND only, not {input_layout}")
    if attn_mask is not None:
        if sparse_mode != 0:
            raise ValueError(f"flash_attention: attn_mask is taken with sparse_mode 0 only, got {sparse_mode}")
        if attn_mask.dtype not in (ms.bool_, ms.uint8):
            raise ValueError(f"flash_attention: attn_mask must be bool or uint8, got {attn_mask.dtype}")
        batch = query.shape[0]
        shape = tuple(attn_mask.shape)
        ok = shape == (sq, skv) or (
            len(shape) == 4 and shape[0] in (1, batch) and shape[1] in (1, nq) and shape[2:] == (sq, skv)
        )
        if not ok:
            raise ValueError(f"flash_attention: attn_mask shape {shape} is not [B, N|1, {sq}, {skv}] or [{sq}, {skv}]")
    scale = float(scalar_value) if scalar_value is not None else 1.0 / math.sqrt(d)
    op = _cached(head_num, scale, input_layout, sparse_mode, int(pre_tokens), int(next_tokens), query.dtype, d)
    return op(query, key, value, cu_q, cu_kv, attn_mask)
