"""End-to-end training throughput: omni_fast's Trainer against a plain PyTorch loop over transformers' Thinker.

Same ~21M-parameter config as bench_thinker.py, same weights, same batches (batch 1, one 1024-token row of
image + audio + text, or one 1024-token text row), every parameter trained, AdamW (torch.optim.AdamW with the same
hyper-parameters on the torch side). One timed round = ``STEPS`` optimizer steps on the same kind of row, after a
warm-up that compiles omni_fast's graphs (``ms.jit``; first-step compile time is not throughput). tokens/s counts
every token of the row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from bench_thinker import ROWS, build_hf_thinker_sdpa, make_inputs, thinker_config_dict, torch_inputs
from harness import alternating_minima, wait_for_quiet
from tiny_omni import save_hf_thinker

from omni_fast.config.mm_model import ModelSpec
from omni_fast.config.model_config import ThinkerConfig
from omni_fast.config.train_config import TrainConfig
from omni_fast.model import Qwen2_5OmniThinker
from omni_fast.model.flops import training_flops
from omni_fast.train.trainer import Trainer

STEPS = 4
OMNI = "omni_fast Trainer (jit)"
TORCH = "PyTorch loop (transformers, sdpa, AdamW)"
LR = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = build_hf_thinker_sdpa(thinker_config_dict("21M"))
    path = save_hf_thinker(hf, tmp_path_factory.mktemp("hf21m") / "thinker")
    return hf, path


def omni_trainer(path, row_inputs: dict[str, Any]) -> Trainer:
    model = Qwen2_5OmniThinker.from_pretrained(path)
    spec = ModelSpec.from_thinker(model.config)
    spec.freeze = dict.fromkeys(spec.freeze, False)  # train everything, as the torch loop does
    config = TrainConfig(micro_batch_size=1, global_batch_size=1, lr=LR, lr_decay_style="constant",
                         weight_decay=0.0, clip_grad=1.0, train_iters=10**6)
    return Trainer(config, spec, model, [row_inputs], lambda samples: dict(samples[0]))


def torch_loop(hf: torch.nn.Module, inputs: dict[str, Any]) -> Callable[[], list[float]]:
    """``STEPS`` optimizer steps of the plain PyTorch loop (a copy of ``hf``, torch.optim.AdamW, clip 1.0), warmed."""
    model = build_hf_thinker_sdpa(thinker_config_dict("21M"))
    model.load_state_dict(hf.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    batch = torch_inputs(inputs)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return float(loss)

    step()
    return lambda: [step() for _ in range(STEPS)]


@pytest.mark.parametrize("row", list(ROWS))
@pytest.mark.parametrize("impl", [OMNI, TORCH])
def test_training_throughput(benchmark, models, row, impl):
    hf, path = models
    inputs = make_inputs(ROWS[row])
    tokens = int(inputs["input_ids"].size)
    if impl == OMNI:
        trainer = omni_trainer(path, inputs)
        trainer.train_step()  # compiles
        trainer.train_step()

        def run():
            return [trainer.train_step().loss for _ in range(STEPS)]
    else:
        run = torch_loop(hf, inputs)

    benchmark.group = f"train step, 21M Thinker, {row}"
    wait_for_quiet()
    losses = benchmark.pedantic(run, rounds=3, iterations=1)
    assert np.isfinite(losses).all()
    details: dict[str, Any] = {"optimizer steps per round": STEPS, "tokens per step": tokens}
    details["GFLOP/step"] = training_flops(ThinkerConfig.from_file(path / "config.json"), inputs) / 1e9
    if impl == OMNI:  # the same comparison with the two loops' rounds alternating (harness.alternating_minima)
        ours, peer = alternating_minima(run, torch_loop(hf, inputs), rounds=3)
        details["vs PyTorch loop, alternating rounds"] = round(peer / ours, 2)
    benchmark.extra_info.update(
        impl=impl,
        headline=impl == OMNI,
        compare={"vs PyTorch loop": TORCH} if impl == OMNI else {},
        tokens=tokens * STEPS,
        flops=details["GFLOP/step"] * 1e9 * STEPS,  # matmul FLOPs of forward + backward (omni_fast.model.flops)
        details=details,
        note="One round = optimizer steps on batch 1 (all parameters trained, AdamW, clip 1.0), after warm-up "
        "steps that compile omni_fast's graphs. tokens/s counts every token of the row. GFLOP/s counts the step's "
        "matmul FLOPs (forward + backward, omni_fast.model.flops, as in the Thinker benchmark) over the whole step, "
        "optimizer included: the % of the FMA ceiling says how far from this machine's arithmetic limit each loop is.",
    )
