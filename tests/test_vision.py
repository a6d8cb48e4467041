"""Parity of the MindSpore vision tower with transformers' ``thinker.visual`` (forward, gradients, jit)."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
import torch
from conftest import assert_rel_close
from mindspore import Tensor

from omni_fast.config.model_config import VisionConfig
from omni_fast.model.vision import VisionEncoder, prepare_vision_inputs

GRIDS = {
    "image": [[1, 20, 28]],
    # Merged grids 5x7 and 3x11: neither is a multiple of the 4x4 window, so partial windows are exercised.
    "two_images": [[1, 10, 14], [1, 6, 22]],
    # Four temporal slices: full-attention blocks must attend per slice, not across the video.
    "video": [[4, 12, 16]],
}


def vision_config(hf_model) -> VisionConfig:
    return VisionConfig.from_dict(hf_model.config.vision_config.to_dict())


def load_from_torch(enc: VisionEncoder, state_dict: dict) -> None:
    """Copy a transformers ``visual`` state dict into ``enc`` by parameter name (names must match exactly)."""
    ours = dict(enc.parameters_and_names())
    assert set(ours) == set(state_dict), set(ours) ^ set(state_dict)
    for name, param in ours.items():
        value = state_dict[name].detach().float().numpy()
        assert tuple(param.shape) == value.shape, name
        param.set_data(Tensor(value).astype(param.dtype))


def case_inputs(grid: list[list[int]], cfg: VisionConfig, seed: int = 0):
    grid_np = np.asarray(grid, dtype=np.int64)
    n = int(np.prod(grid_np, axis=1).sum())
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((n, cfg.patch_dim)).astype(np.float32)
    weight = rng.standard_normal((n // cfg.spatial_merge_size**2, cfg.out_hidden_size)).astype(np.float32)
    return grid_np, pixels, weight


def plan_tensors(grid: np.ndarray, cfg: VisionConfig) -> list[Tensor]:
    return [Tensor(a) for a in prepare_vision_inputs(grid, cfg)]


@pytest.fixture(scope="module")
def encoder(hf_tiny) -> VisionEncoder:
    enc = VisionEncoder(vision_config(hf_tiny))
    load_from_torch(enc, hf_tiny.visual.state_dict())
    return enc


def torch_forward_and_grads(hf_model, grid: np.ndarray, pixels: np.ndarray, weight: np.ndarray):
    """transformers output, and d(sum(out * weight)) w.r.t. pixel_values and every ``visual`` parameter."""
    visual = hf_model.visual
    pv = torch.from_numpy(pixels).requires_grad_(True)
    names, params = zip(*visual.named_parameters())
    out = visual(pv, grid_thw=torch.from_numpy(grid))
    loss = (out * torch.from_numpy(weight)).sum()
    grads = torch.autograd.grad(loss, [pv, *params])  # no .grad left on the shared session model
    return out.detach().numpy(), grads[0].numpy(), {n: g.numpy() for n, g in zip(names, grads[1:])}


def make_grad_fn(enc: VisionEncoder):
    def loss_fn(pixels, weight, *plan):
        return (enc(pixels, *plan) * weight).sum()

    return ms.value_and_grad(loss_fn, grad_position=0, weights=enc.trainable_params())


def test_parameter_names_and_shapes(hf_tiny) -> None:
    enc = VisionEncoder(vision_config(hf_tiny))
    ours = [(name, tuple(p.shape)) for name, p in enc.parameters_and_names()]
    theirs = [(name, tuple(t.shape)) for name, t in hf_tiny.visual.state_dict().items()]
    assert sorted(ours) == sorted(theirs)
    assert len(ours) == len(theirs)


@pytest.mark.parametrize("case", list(GRIDS))
def test_plan_matches_transformers(hf_tiny, case: str) -> None:
    """Window permutation, window segments and rotary positions agree with transformers' own helpers."""
    cfg = vision_config(hf_tiny)
    grid = np.asarray(GRIDS[case], dtype=np.int64)
    plan = prepare_vision_inputs(grid, cfg)
    index, cu_window = hf_tiny.visual.get_window_index(torch.from_numpy(grid))
    np.testing.assert_array_equal(plan.window_index, index.numpy())
    np.testing.assert_array_equal(plan.window_index[plan.reverse_index], np.arange(len(index)))
    # Window ends are exactly transformers' non-empty cu_window_seqlens.
    expected = np.unique(np.asarray(cu_window))
    np.testing.assert_array_equal(np.concatenate([[0], plan.window_cu_seqlens]), expected)
    slice_lens = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])
    np.testing.assert_array_equal(np.diff(plan.full_cu_seqlens, prepend=0), slice_lens)
    # Rotary tables: transformers' rot_pos_emb permuted by the window index, per merge unit.
    unit = cfg.spatial_merge_size**2
    rot = hf_tiny.visual.rot_pos_emb(torch.from_numpy(grid)).numpy()
    rot = rot.reshape(-1, unit, rot.shape[-1])[plan.window_index].reshape(-1, rot.shape[-1])
    inv_freq = hf_tiny.visual.rotary_pos_emb.inv_freq.numpy()
    ours = (plan.rotary_pos_ids[:, :, None].astype(np.float32) * inv_freq).reshape(len(rot), -1)
    np.testing.assert_array_equal(ours, rot)


@pytest.mark.parametrize("case", list(GRIDS))
def test_forward_and_grads_match_transformers(hf_tiny, encoder: VisionEncoder, case: str) -> None:
    cfg = vision_config(hf_tiny)
    grid, pixels, weight = case_inputs(GRIDS[case], cfg)
    ref_out, ref_dpix, ref_dparams = torch_forward_and_grads(hf_tiny, grid, pixels, weight)
    plan = plan_tensors(grid, cfg)

    out = encoder(Tensor(pixels), *plan).asnumpy()
    assert_rel_close(out, ref_out, 1e-5, "output")

    _, (dpix, dparams) = make_grad_fn(encoder)(Tensor(pixels), Tensor(weight), *plan)
    assert_rel_close(dpix.asnumpy(), ref_dpix, 1e-4, "pixel_values")
    names = [p.name for p in encoder.trainable_params()]
    assert sorted(names) == sorted(ref_dparams)
    for name, grad in zip(names, dparams):
        assert_rel_close(grad.asnumpy(), ref_dparams[name], 1e-4, name)


def test_jit_forward_and_grads_match_pynative(hf_tiny, encoder: VisionEncoder) -> None:
    cfg = vision_config(hf_tiny)
    grid, pixels, weight = case_inputs(GRIDS["two_images"], cfg, seed=1)
    plan = plan_tensors(grid, cfg)
    grad_fn = make_grad_fn(encoder)

    @ms.jit
    def jit_step(pixels, weight, *plan):
        return encoder(pixels, *plan), grad_fn(pixels, weight, *plan)

    args = (Tensor(pixels), Tensor(weight), *plan)
    out_jit, (loss_jit, (dpix_jit, dparams_jit)) = jit_step(*args)
    out_eager = encoder(Tensor(pixels), *plan)
    loss_eager, (dpix_eager, dparams_eager) = grad_fn(*args)

    assert_rel_close(out_jit.asnumpy(), out_eager.asnumpy(), 1e-5, "output")
    assert_rel_close(loss_jit.asnumpy(), loss_eager.asnumpy(), 1e-5, "loss")
    assert_rel_close(dpix_jit.asnumpy(), dpix_eager.asnumpy(), 1e-5, "pixel_values")
    assert len(dparams_jit) == len(dparams_eager) == len(encoder.trainable_params())
    for param, g_jit, g_eager in zip(encoder.trainable_params(), dparams_jit, dparams_eager):
        assert_rel_close(g_jit.asnumpy(), g_eager.asnumpy(), 1e-5, param.name)


@pytest.mark.parametrize("grid", [[[1, 5, 14]], [[1, 10, 7]], [[1, 10, 14], [2, 4, 3]]])
def test_prepare_rejects_grid_not_multiple_of_merge(hf_tiny, grid: list[list[int]]) -> None:
    with pytest.raises(ValueError, match="spatial_merge_size"):
        prepare_vision_inputs(np.asarray(grid), vision_config(hf_tiny))
