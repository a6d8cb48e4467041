"""One pipeline stage of the Thinker: the parameters it owns and its share of ``Qwen2_5OmniThinker.compute``.

How the multimodal forward splits (encoders first, see ``layout.py``):

* the audio tower and the vision tower (run once for images, once for videos) execute on the stages holding their
  layers: the front end (audio convs / vision patch embed and window order) on the tower's first stage with layers,
  its layers where ``pipeline_num_layers`` puts them, its back end (audio pool + ``ln_post`` + ``proj`` / vision
  ``merger`` + raster order) on its last stage with layers;
* what a stage hands to the next is a *carry*: the partial or finished tower outputs (``audio``, ``image``,
  ``video``) until the text starts, then the text hidden state (``hidden``). Because every encoder layer comes before
  the first text layer, the finished encoder outputs are all available on the stage holding the text embedding,
  which scatters them into the token embeddings; no stage ever waits for an encoder from a later stage;
* the last stage applies the final norm, ``lm_head`` and the weighted loss.

Every stage plans the micro-batch on the host itself (``prepare_batch`` is deterministic numpy), so only activations
and their gradients travel between stages. The pieces below call the towers' own sub-cells; the few lines of glue
between them mirror ``AudioEncoder.construct``, ``VisionEncoder.construct``, ``TextModel.construct`` and
``Qwen2_5OmniThinker.compute``, and tests/test_parallel.py pins the chained stages equal to ``compute`` (loss and
every gradient) for several layouts.
"""

from __future__ import annotations

from typing import Any

from mindspore import Parameter, Tensor

from omni_fast.model import Qwen2_5OmniThinker
from omni_fast.model.text import padded_row_segments
from omni_fast.model.thinker import causal_lm_loss
from omni_fast.ops.scatter import multimodal_scatter
from omni_fast.parallel.layout import PipelineLayout, stage_parts

# Carries in the order they travel; each encoder carry belongs to the module that computes it.
CARRY_KEYS = ("audio", "image", "video", "hidden")
CARRY_MODULE = {"audio": "audio_encoder", "image": "vision_encoder", "video": "vision_encoder"}
# Positions of the modality plans in PreparedBatch.arguments(): (input_ids, attention_mask, position_ids, labels,
# image, video, audio).
PLAN_INDEX = {"image": 4, "video": 5, "audio": 6}


class PipelineStage:
    """The pieces of ``model`` that pipeline stage ``stage`` of ``layout`` owns and runs."""

    def __init__(self, model: Qwen2_5OmniThinker, layout: PipelineLayout, stage: int):
        if not 0 <= stage < layout.size:
            raise ValueError(f"stage {stage} is outside a pipeline of {layout.size} stages")
        self.model = model
        self.layout = layout
        self.stage = stage
        self.is_last = stage == layout.size - 1
        self.text_first = layout.first_stage("text_decoder")
        prefixes = tuple(prefix for prefix, _ in stage_parts(layout, stage))
        self.parameters: list[Parameter] = [p for name, p in model.parameters_and_names() if name.startswith(prefixes)]

    def trainable_params(self) -> list[Parameter]:
        return [p for p in self.parameters if p.requires_grad]

    # ------------------------------------------------------------------ what travels

    def _runs(self, module: str) -> bool:
        return self.layout.first_stage(module) <= self.stage <= self.layout.last_stage(module)

    def output_keys(self, batch: tuple) -> tuple[str, ...]:
        """The carry this stage sends on for ``batch`` (``PreparedBatch.arguments()``); empty for the last stage."""
        return carry_after(self.layout, self.stage, batch)

    def input_keys(self, batch: tuple) -> tuple[str, ...]:
        return () if self.stage == 0 else carry_after(self.layout, self.stage - 1, batch)

    # ------------------------------------------------------------------ compute

    def function(self, batch: tuple, loss_weights: Tensor | None):
        """``f(*carry_in) -> carry_out tuple`` (or the loss on the last stage), for running and differentiating."""
        keys = self.input_keys(batch)
        out_keys = self.output_keys(batch)

        def run(*values: Tensor):
            carry = self.forward(batch, loss_weights, dict(zip(keys, values)))
            return carry if self.is_last else tuple(carry[k] for k in out_keys)

        return run

    def forward(self, batch: tuple, loss_weights: Tensor | None, carry: dict[str, Tensor]) -> Any:
        """This stage's part of ``Qwen2_5OmniThinker.compute``: the next carry (a dict), or the loss when last."""
        input_ids, attention_mask, position_ids, labels = batch[:4]
        carry = dict(carry)
        for key in ("audio", "image", "video"):
            plan = batch[PLAN_INDEX[key]]
            module = CARRY_MODULE[key]
            if plan is None or not self._runs(module):
                continue  # absent, not started yet, or finished and passing through
            first, last = self.layout.first_stage(module), self.layout.last_stage(module)
            layers = self.layout.layer_range(module, self.stage)
            if key == "audio":
                x = self._audio_front(plan) if self.stage == first else carry[key]
                x = self._audio_layers(plan, x, layers)
                carry[key] = self._audio_back(plan, x) if self.stage == last else x
            else:
                x = self._vision_front(plan) if self.stage == first else carry[key]
                x = self._vision_layers(plan, x, layers)
                carry[key] = self._vision_back(plan, x) if self.stage == last else x
        if self.stage < self.text_first:
            return carry
        text = self.model.model
        cfg = self.model.config
        if self.stage == self.text_first:
            hidden = multimodal_scatter(
                text.embed(input_ids),
                input_ids,
                image_embeds=carry.get("image"),
                video_embeds=carry.get("video"),
                audio_embeds=carry.get("audio"),
                image_token_id=cfg.image_token_id,
                video_token_id=cfg.video_token_id,
                audio_token_id=cfg.audio_token_id,
            )
        else:
            hidden = carry["hidden"]
        layers = self.layout.layer_range("text_decoder", self.stage)
        if len(layers):
            cos, sin = text.rotary(position_ids)
            segment_ends = padded_row_segments(attention_mask)
            for i in layers:
                hidden = text.layers[i](hidden, cos, sin, segment_ends)
        if not self.is_last:
            return {"hidden": hidden}
        return causal_lm_loss(self.model.lm_head(text.norm(hidden)), labels, loss_weights)

    # Audio: AudioEncoder.construct cut at its layers. plan = (features, tap_audio, tap_frame, mel_mask, keep_index,
    # cu_seqlens, pool_index).
    def _audio_front(self, plan: tuple) -> Tensor:
        return self.model.audio_tower.front(*plan[:5])

    def _audio_layers(self, plan: tuple, x: Tensor, layers: range) -> Tensor:
        for i in layers:
            x = self.model.audio_tower.layers[i](x, plan[5])
        return x

    def _audio_back(self, plan: tuple, x: Tensor) -> Tensor:
        return self.model.audio_tower.back(x, plan[6])

    # Vision: VisionEncoder.construct cut at its blocks. plan = (pixel_values, window_index, reverse_index,
    # window_cu_seqlens, full_cu_seqlens, rotary_pos_ids).
    def _vision_front(self, plan: tuple) -> Tensor:
        return self.model.visual.front(plan[0], plan[1])

    def _vision_layers(self, plan: tuple, x: Tensor, layers: range) -> Tensor:
        visual = self.model.visual
        if len(layers):
            cos, sin = visual.rotary_cos_sin(plan[5])
            for i in layers:
                cu_seqlens = plan[4] if visual.full_attention[i] else plan[3]
                x = visual.blocks[i](x, cos, sin, cu_seqlens)
        return x

    def _vision_back(self, plan: tuple, x: Tensor) -> Tensor:
        return self.model.visual.back(x, plan[2])


def carry_after(layout: PipelineLayout, stage: int, batch: tuple) -> tuple[str, ...]:
    """Names of the tensors stage ``stage`` hands to stage ``stage + 1`` for ``batch``, in ``CARRY_KEYS`` order."""
    if stage == layout.size - 1:
        return ()
    if stage >= layout.first_stage("text_decoder"):
        return ("hidden",)
    return tuple(
        key
        for key in CARRY_KEYS[:3]
        if batch[PLAN_INDEX[key]] is not None and layout.first_stage(CARRY_MODULE[key]) <= stage
    )

