"""omni_fast.model.flops (the trainer's MFU, the benchmarks' GFLOP/s) against torch's FlopCounterMode on
transformers' Thinker, forward + backward, with every module trained and with some frozen."""

from __future__ import annotations

import pytest
import torch
from test_thinker import make_case, torch_inputs
from tiny_omni import build_hf_thinker, tiny_thinker_config_dict
from torch.utils.flop_counter import FlopCounterMode

from omni_fast.config.model_config import ThinkerConfig
from omni_fast.model.flops import ALL_TRAINED, PART_MODULE, training_flops_by_part

# transformers' parameter names per trainer module (the thinker's own prefixes).
HF_MODULE = {
    "vision_projector": ("visual.merger.",),
    "vision_encoder": ("visual.",),
    "audio_encoder": ("audio_tower.",),
    "text_decoder": ("model.", "lm_head."),
}


# An image, a video and an audio over two left-padded rows. The audio fills whole attention chunks (2 x n_window =
# 200 frames): transformers pads a partial chunk and convolves the padding, which ours does not count as work.
ROWS = [
    [("text", 3), ("image", (1, 6, 10)), ("audio", 400), ("text", 6)],
    [("text", 5), ("video", (2, 8, 8), 0.5), ("text", 9)],
]


def counted_by_torch(model: torch.nn.Module, inputs: dict, trained: dict[str, bool]) -> float:
    for name, param in model.named_parameters():
        module = next(m for m, prefixes in HF_MODULE.items() if name.startswith(prefixes))
        param.requires_grad_(trained[module])
    counter = FlopCounterMode(display=False)
    with counter:
        model(**torch_inputs(inputs)).loss.backward()
    # transformers builds its rope table with a matmul of positions by frequencies; ours is not model work
    rotary = counter.get_flop_counts().get(f"{type(model).__name__}.model.rotary_emb", {})
    return float(counter.get_total_flops() - sum(rotary.values()))


@pytest.fixture(scope="module")
def hf_sdpa():
    # sdpa: torch's CPU attention kernel is invisible to FlopCounterMode, so the counter sees every matmul but the
    # attention products, which ours counts over attended pairs only (eager attention would count masked ones too).
    return build_hf_thinker(attn_implementation="sdpa").train()


@pytest.mark.parametrize(
    "frozen",
    [(), ("vision_encoder", "vision_projector", "audio_encoder"), ("text_decoder", "vision_projector")],
    ids=["all_trained", "encoders_frozen", "decoder_and_merger_frozen"],
)
def test_matmul_flops_match_torch_flop_counter(hf_sdpa, frozen):
    inputs = make_case(ROWS)
    trained = {**ALL_TRAINED, **dict.fromkeys(frozen, False)}
    cfg = ThinkerConfig.from_dict(tiny_thinker_config_dict())
    parts = training_flops_by_part(cfg, inputs, trained)
    assert set(parts) <= set(PART_MODULE)
    ours = sum(value for name, value in parts.items() if not name.endswith("_attention"))
    assert ours == counted_by_torch(hf_sdpa, inputs, trained)
