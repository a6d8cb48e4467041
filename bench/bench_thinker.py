"""One Thinker training step (forward + backward, no optimizer) of omni_fast against transformers, same weights,
same inputs, same run.

Models: the tiny test config (tests/tiny_omni.py) and a 21.2M-parameter config mirroring transformers_omni.md
section 9 (text 512 x 4 layers, 8 heads / 2 KV, ffn 1536, vocab 1024; vision 256 x 4 blocks, the last one full
attention; audio 256 x 4 layers). Rows of 1024 tokens: one 448x448 image (grid 1x32x32 -> 256 tokens) + a 10 s
audio (1000 mel frames -> 250 tokens) + text, and text only.

Rows per case:

* omni_fast: ``ms.value_and_grad`` of ``Qwen2_5OmniThinker.compute`` over all parameters, compiled with
  ``ms.jit``; the batch is planned once (``prepare_batch``), as the trainer's data loader does;
* omni_fast with every op on the reference backend (``OMNI_FAST_BACKEND=reference``): what our kernels buy
  end to end;
* transformers 4.53 on torch CPU, ``attn_implementation="sdpa"``, ``loss.backward()`` (its host-side planning,
  rope index and window index, runs inside its step).
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mindspore as ms
import numpy as np
import pytest
import torch
from harness import best_seconds, ms_sync, run_rounds
from sequences import build_batch
from tiny_omni import TINY_IDS, save_hf_thinker, tiny_thinker_config_dict

from omni_fast.model import Qwen2_5OmniThinker
from omni_fast.model.flops import training_flops

OMNI = "omni_fast (jit)"
OMNI_REFERENCE = "omni_fast, reference ops (jit)"
TRANSFORMERS = "transformers (torch, sdpa)"
IMPLS = (OMNI, OMNI_REFERENCE, TRANSFORMERS)
BACKEND = {OMNI: None, OMNI_REFERENCE: "reference"}  # OMNI_FAST_BACKEND for each omni_fast row
COMPARE = {
    OMNI: {"vs transformers": TRANSFORMERS, "vs reference ops": OMNI_REFERENCE},
    OMNI_REFERENCE: {"vs transformers": TRANSFORMERS},
}

MEL_BINS = 128
PATCH_DIM = 3 * 2 * 14 * 14
ROWS = {
    # 20 + (256 + 2) + 30 + (250 + 2) + 464 = 1024 tokens
    "image+audio+text": [("text", 20), ("image", (1, 32, 32)), ("text", 30), ("audio", 1000), ("text", 464)],
    "text only": [("text", 1024)],
}
CASES = [(model, row) for model in ("tiny", "21M") for row in ROWS]

NOTE = (
    "One step = forward + backward of the causal-LM loss w.r.t. all parameters, batch 1, fp32, no optimizer. "
    "Both sides get the same weights (transformers model built with seed 0, saved with `save_hf_thinker` and "
    "loaded with `Qwen2_5OmniThinker.from_pretrained`) and the same inputs; the losses are checked equal "
    "(relative 1e-4, untimed) before timing. omni_fast's batch is prepared once outside the step (`prepare_batch` "
    "time in its own column); transformers plans its rope and window indices inside the step. **GFLOP/s counts "
    "matmul FLOPs directly** (omni_fast.model.flops): every linear layer, the patch projection, the audio "
    "convolutions, the lm_head and the two attention products over the attended blocks only (causal triangle, "
    "vision windows, audio chunks), backward = 2x forward (1x for the layers fed by data). It equals torch's "
    "FlopCounterMode on the transformers model for everything but attention, which that counter does not see on "
    "CPU (tests/test_flops.py). The reference-ops "
    "row builds its model and compiles its step under `OMNI_FAST_BACKEND=reference`, so every dispatched op "
    "(layer cells and function faces such as `multimodal_scatter`) runs its plain MindSpore reference; the "
    "*Op backends* line lists the layer cells' choices."
)


def thinker_config_dict(name: str) -> dict[str, Any]:
    """transformers-style thinker config: the tiny test model, or the ~21M-parameter one of transformers_omni.md."""
    cfg = copy.deepcopy(tiny_thinker_config_dict())
    if name == "21M":
        cfg["text_config"].update(
            hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2,
            # head_dim 64: the mRoPE sections must sum to 32 (the 7B's [16, 24, 24] is for head_dim 128)
            rope_scaling={"mrope_section": [8, 12, 12], "rope_type": "default", "type": "default"},
        )  # fmt: skip
        cfg["vision_config"].update(
            depth=4, hidden_size=256, intermediate_size=512, num_heads=4, out_hidden_size=512,
            fullatt_block_indexes=[3],
        )  # fmt: skip
        cfg["audio_config"].update(
            d_model=256, encoder_layers=4, encoder_attention_heads=4, encoder_ffn_dim=1024, output_dim=512
        )
    return cfg


def build_hf_thinker_sdpa(config: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    """Like tests/tiny_omni.build_hf_thinker, but with transformers' fastest CPU attention (sdpa), in train mode."""
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Qwen2_5OmniThinkerConfig(**config)
    cfg._attn_implementation = "sdpa"  # set before construction: the sub-models copy it from here
    model = Qwen2_5OmniThinkerForConditionalGeneration(cfg).float().train()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():  # non-trivial norm weights and biases, as in the parity tests
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return model


def make_inputs(row: list[tuple], seed: int = 0) -> dict[str, Any]:
    """numpy model inputs for one row (tests/test_thinker.py's make_case, without padding)."""
    rng = np.random.default_rng(seed)
    seq = build_batch([row], seed=seed)
    inputs: dict[str, Any] = {"input_ids": seq.input_ids, "attention_mask": seq.attention_mask}
    if seq.image_grid_thw is not None:
        patches = int(seq.image_grid_thw.prod(-1).sum())
        inputs["pixel_values"] = rng.standard_normal((patches, PATCH_DIM), dtype=np.float32)
        inputs["image_grid_thw"] = seq.image_grid_thw
    if seq.audio_seqlens is not None:
        frames = int(seq.audio_seqlens.max())
        inputs["input_features"] = rng.standard_normal((len(seq.audio_seqlens), MEL_BINS, frames), dtype=np.float32)
        inputs["feature_attention_mask"] = np.ones((len(seq.audio_seqlens), frames), np.int32)
    labels = seq.input_ids.copy()
    for name in ("image", "audio"):
        labels[seq.input_ids == TINY_IDS[name]] = -100
    inputs["labels"] = labels
    return inputs


def torch_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    out = {k: torch.from_numpy(v) for k, v in inputs.items()}
    for k in ("input_ids", "labels", "image_grid_thw"):
        if k in out:
            out[k] = out[k].long()
    return out


@contextlib.contextmanager
def backend_scope(forced: str | None) -> Iterator[None]:
    """``OMNI_FAST_BACKEND=forced`` (None: the dispatcher's own choice) while building a model and compiling its step.

    Layers choose their backend when built, but the function faces (``multimodal_scatter``, ``rms_norm``,
    ``flash_attention``) build their op cell on first use, during the jit trace, and cache it per dtype/shape
    key, not per backend. So the caches are emptied on entry and exit: each model's graph gets cells chosen
    under its own setting, and nothing chosen here leaks into the next model.
    """

    def clear_face_caches() -> None:
        for name, module in list(sys.modules.items()):
            cached = getattr(module, "_cached", None) if name.startswith("omni_fast.ops.") else None
            if hasattr(cached, "cache_clear"):
                cached.cache_clear()

    previous = os.environ.pop("OMNI_FAST_BACKEND", None)
    if forced is not None:
        os.environ["OMNI_FAST_BACKEND"] = forced
    clear_face_caches()
    try:
        yield
    finally:
        clear_face_caches()
        os.environ.pop("OMNI_FAST_BACKEND", None)
        if previous is not None:
            os.environ["OMNI_FAST_BACKEND"] = previous


def backends_used(model: Qwen2_5OmniThinker) -> str:
    """ "RmsNorm: cpu_kernel x13, ..." over the model's op cells (those that carry a dispatcher choice)."""
    counts = Counter(
        f"{type(cell).__name__}: {cell.backend}"
        for _, cell in model.cells_and_names()
        if isinstance(getattr(cell, "backend", None), str)
    )
    return ", ".join(f"{key} x{n}" for key, n in sorted(counts.items()))


@dataclass
class Models:
    hf: torch.nn.Module
    ours: Qwen2_5OmniThinker
    ours_reference: Qwen2_5OmniThinker
    steps: dict[str, Callable[..., Any]]  # impl -> jit'd value_and_grad step (omni_fast rows)
    params: int


def _jit_step(model: Qwen2_5OmniThinker) -> Callable[..., Any]:
    """The trainer's step without the optimizer (as trainer.py builds it): value_and_grad inside ms.jit."""
    params = model.trainable_params()

    def loss_fn(*args: Any) -> Any:
        return model.compute(*args)[1]

    grad_fn = ms.value_and_grad(loss_fn, None, params)

    @ms.jit
    def step(*args: Any) -> Any:
        return grad_fn(*args)

    return step


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Models]:
    cache: dict[str, Models] = {}

    def get(name: str) -> Models:
        if name not in cache:
            hf = build_hf_thinker_sdpa(thinker_config_dict(name))
            path = save_hf_thinker(hf, Path(tmp_path_factory.mktemp(f"thinker_{name}")) / "thinker")
            with backend_scope(BACKEND[OMNI]):
                ours = Qwen2_5OmniThinker.from_pretrained(path)
            with backend_scope(BACKEND[OMNI_REFERENCE]):
                ours_reference = Qwen2_5OmniThinker.from_pretrained(path)
            steps = {OMNI: _jit_step(ours), OMNI_REFERENCE: _jit_step(ours_reference)}
            params = sum(p.numel() for p in hf.parameters())
            cache[name] = Models(hf, ours, ours_reference, steps, params)
        return cache[name]

    return get


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("model_name", "row"), CASES, ids=[f"{m}-{r.replace(' ', '_')}" for m, r in CASES])
def test_thinker_train_step(
    benchmark: Any, models: Callable[[str], Models], model_name: str, row: str, impl: str
) -> None:
    m = models(model_name)
    inputs = make_inputs(ROWS[row])
    tokens = int(inputs["input_ids"].size)
    benchmark.group = f"Thinker fwd+bwd, {model_name} ({m.params / 1e6:.2f}M params), {row}, {tokens} tokens"
    details: dict[str, float] = {}

    tin = torch_inputs(inputs)
    with torch.no_grad():
        hf_loss = float(m.hf(**tin).loss)

    if impl == TRANSFORMERS:

        def fn() -> torch.Tensor:
            m.hf.zero_grad(set_to_none=True)
            loss = m.hf(**tin).loss
            loss.backward()
            return loss

        loss = float(fn().detach())
        backends = "torch"
    else:
        model = m.ours if impl == OMNI else m.ours_reference
        details["prepare_batch ms"] = 1e3 * best_seconds(lambda: model.prepare_batch(**inputs), repeats=3, warmup=0)
        args = model.prepare_batch(**inputs).arguments()
        step = m.steps[impl]

        def fn() -> Any:
            return ms_sync(step(*args))

        start = time.perf_counter()
        with backend_scope(BACKEND[impl]):  # the first call traces and compiles the graph
            loss = float(fn()[0].asnumpy())
        details["compile s"] = time.perf_counter() - start
        backends = backends_used(model)
    assert abs(loss - hf_loss) <= 1e-4 * abs(hf_loss), f"{impl}: loss {loss} != transformers {hf_loss}"

    per_call = best_seconds(fn, repeats=1, warmup=0)
    # About 12 s per row, 4 to 10 rounds: the 21M steps take ~1-2 s on a quiet machine, the tiny ones ~0.1 s.
    rounds = int(min(10, max(4, 12 // max(per_call, 1e-3))))
    details.update(run_rounds(benchmark, fn, rounds))  # the calls above were the warm-up

    details["loss"] = loss
    flops = training_flops(m.ours.config, inputs)
    details["GFLOP/step"] = flops / 1e9
    # tokens/s, GFLOP/s, % of the GEMM peak and the ratios are derived from the minima when the JSON is written.
    benchmark.extra_info.update(
        section="Thinker training step (forward + backward)",
        impl=impl,
        compare=COMPARE.get(impl, {}),
        headline=impl == OMNI,
        tokens=tokens,
        flops=flops,
        backends=backends,
        details=details,
        note=NOTE,
    )
