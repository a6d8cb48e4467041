"""Parity of the MindSpore audio encoder with transformers' ``thinker.get_audio_features`` (forward and gradients)."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
import torch
from conftest import assert_rel_close
from tiny_omni import tiny_thinker_config_dict

from omni_fast.config.model_config import AudioConfig
from omni_fast.model.audio import AudioEncoder, audio_output_lengths, prepare_audio_inputs

# (valid mel frames per audio, padded length T_pad)
CASES = {
    "one_450": ([450], 450),  # chunks 200 + 200 + 50
    "three_padded": ([200, 37, 613], 640),  # exact chunk, a short one, 4 chunks; random values in the padding
    "one_401": ([401], 401),  # last chunk of a single frame
}


def tiny_audio_config() -> AudioConfig:
    return AudioConfig.from_dict(tiny_thinker_config_dict()["audio_config"])


def load_state_dict(cell: ms.nn.Cell, state: dict[str, torch.Tensor]) -> None:
    """Copy transformers tensors into our parameters by (identical) name."""
    for name, param in cell.parameters_and_names():
        param.set_data(ms.Tensor(state[name].detach().float().numpy()).astype(param.dtype))


@pytest.fixture(scope="module")
def encoder(hf_tiny) -> AudioEncoder:
    enc = AudioEncoder(tiny_audio_config())
    load_state_dict(enc, hf_tiny.audio_tower.state_dict())
    return enc


def make_case(name: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Features (random everywhere, padding included), 0/1 mask, lengths, and the loss weights G."""
    lengths, t_pad = CASES[name]
    lengths = np.asarray(lengths, dtype=np.int64)
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((lengths.size, 128, t_pad)).astype(np.float32)
    mask = (np.arange(t_pad)[None, :] < lengths[:, None]).astype(np.int64)
    n_out = int(audio_output_lengths(lengths).sum())
    g = rng.standard_normal((n_out, tiny_audio_config().output_dim)).astype(np.float32)
    return feats, mask, lengths, g


def hf_value_and_grads(hf, feats, mask, g) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """transformers output, grads of every audio_tower parameter that gets one, and d loss / d features."""
    x = torch.tensor(feats, requires_grad=True)
    out = hf.get_audio_features(x, feature_attention_mask=torch.tensor(mask), audio_feature_lengths=None)
    loss = (out * torch.tensor(g)).sum()
    named = list(hf.audio_tower.named_parameters())
    grads = torch.autograd.grad(loss, [x] + [p for _, p in named], allow_unused=True)
    param_grads = {n: gr.numpy() for (n, _), gr in zip(named, grads[1:]) if gr is not None}
    return out.detach().numpy(), param_grads, grads[0].numpy()


def ms_grad_fn(enc: AudioEncoder, g: np.ndarray):
    g_t = ms.Tensor(g)

    def loss_fn(x, *prepared):
        out = enc(x, *prepared)
        return (out * g_t).sum(), out

    return ms.value_and_grad(loss_fn, grad_position=0, weights=enc.trainable_params(), has_aux=True)


def as_tensors(arrays: tuple[np.ndarray, ...]) -> list[ms.Tensor]:
    return [ms.Tensor(a) for a in arrays]


def test_parameter_names_and_shapes_match_state_dict(hf_tiny, encoder):
    ours = [(n, tuple(p.shape)) for n, p in encoder.parameters_and_names()]
    theirs = [(n, tuple(t.shape)) for n, t in hf_tiny.audio_tower.state_dict().items()]
    assert ours == theirs
    frozen = [n for n, p in encoder.parameters_and_names() if not p.requires_grad]
    assert frozen == ["audio_bos_eos_token.weight"]


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_grads_match_transformers(hf_tiny, encoder, case):
    feats, mask, lengths, g = make_case(case)
    ref_out, ref_grads, ref_dx = hf_value_and_grads(hf_tiny, feats, mask, g)

    prepared = as_tensors(prepare_audio_inputs(lengths, tiny_audio_config()))
    (_, out), (dx, dw) = ms_grad_fn(encoder, g)(ms.Tensor(feats), *prepared)

    assert_rel_close(out.asnumpy(), ref_out, 1e-5, "forward")
    valid = mask.astype(bool)[:, None, :].repeat(128, axis=1)
    assert_rel_close(dx.asnumpy()[valid], ref_dx[valid], 1e-4, "d input_features (valid frames)")
    assert not dx.asnumpy()[~valid].any(), "padding frames must get no gradient"
    names = [p.name for p in encoder.trainable_params()]
    assert sorted(names) == sorted(ref_grads), "trainable parameters differ from those transformers differentiates"
    for name, grad in zip(names, dw):
        assert_rel_close(grad.asnumpy(), ref_grads[name], 1e-4, f"d {name}")


def test_jit_matches_pynative(encoder):
    feats, _, lengths, g = make_case("three_padded", seed=1)
    prepared = as_tensors(prepare_audio_inputs(lengths, tiny_audio_config()))
    grad_fn = ms_grad_fn(encoder, g)

    @ms.jit
    def jit_step(x, *prep):
        return grad_fn(x, *prep)

    x = ms.Tensor(feats)
    (_, eager_out), (eager_dx, eager_dw) = grad_fn(x, *prepared)
    (_, jit_out), (jit_dx, jit_dw) = jit_step(x, *prepared)
    assert_rel_close(jit_out.asnumpy(), eager_out.asnumpy(), 1e-5, "jit forward")
    assert_rel_close(jit_dx.asnumpy(), eager_dx.asnumpy(), 1e-5, "jit d input_features")
    for p, a, b in zip(encoder.trainable_params(), jit_dw, eager_dw):
        assert_rel_close(a.asnumpy(), b.asnumpy(), 1e-5, f"jit d {p.name}")


def test_audio_output_lengths_formula(hf_tiny):
    lengths = np.arange(1, 1001)
    _, expected = hf_tiny.audio_tower._get_feat_extract_output_lengths(torch.tensor(lengths))
    np.testing.assert_array_equal(audio_output_lengths(lengths), expected.numpy())


def test_prepare_plan_is_consistent():
    lengths = np.array([450, 1, 200, 613])
    cfg = tiny_audio_config()
    _, _, mel_mask, keep_index, cu_seqlens, pool_index = prepare_audio_inputs(lengths, cfg)
    assert mel_mask.sum() == lengths.sum()
    assert keep_index.size == cu_seqlens[-1] == ((lengths - 1) // 2 + 1).sum()
    assert pool_index.size == audio_output_lengths(lengths).sum()
    assert np.array_equal(np.diff(cu_seqlens, prepend=0), [100, 100, 25, 1, 100, 100, 100, 100, 7])


@pytest.mark.parametrize("lengths, bad", [([5, 0, 3], 1), ([-2], 0), ([7, 8, -1], 2)])
def test_prepare_rejects_non_positive_lengths(lengths, bad):
    with pytest.raises(ValueError, match=rf"audio {bad}\b"):
        prepare_audio_inputs(np.array(lengths), tiny_audio_config())
