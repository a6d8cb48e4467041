"""The whole Thinker against transformers 4.53: loading, logits, loss and gradients."""

from __future__ import annotations

import json

import mindspore as ms
import numpy as np
import pytest
import torch
from conftest import assert_rel_close
from sequences import build_batch
from tiny_omni import TINY_IDS, save_hf_thinker

from omni_fast.model import Qwen2_5OmniThinker
from omni_fast.ops import dispatch

MEL_BINS = 128
PATCH_DIM = 3 * 2 * 14 * 14


def make_case(rows, *, padding_side="left", use_audio_in_video=False, seed=0):
    """Model inputs (numpy) for rows of items, with random media and labels masked like the reference study."""
    rng = np.random.default_rng(seed)
    seq = build_batch(rows, padding_side=padding_side, seed=seed)
    assert seq.use_audio_in_video == use_audio_in_video
    inputs = {"input_ids": seq.input_ids, "attention_mask": seq.attention_mask}
    if seq.image_grid_thw is not None:
        n = int(seq.image_grid_thw.prod(-1).sum())
        inputs["pixel_values"] = rng.standard_normal((n, PATCH_DIM)).astype(np.float32)
        inputs["image_grid_thw"] = seq.image_grid_thw
    if seq.video_grid_thw is not None:
        n = int(seq.video_grid_thw.prod(-1).sum())
        inputs["pixel_values_videos"] = rng.standard_normal((n, PATCH_DIM)).astype(np.float32)
        inputs["video_grid_thw"] = seq.video_grid_thw
        inputs["video_second_per_grid"] = seq.second_per_grids
    if seq.audio_seqlens is not None:
        lengths = seq.audio_seqlens
        t_pad = int(lengths.max())
        feats = rng.standard_normal((len(lengths), MEL_BINS, t_pad)).astype(np.float32)
        mask = (np.arange(t_pad)[None, :] < lengths[:, None]).astype(np.int32)
        inputs["input_features"] = feats * mask[:, None, :]
        inputs["feature_attention_mask"] = mask
    inputs["use_audio_in_video"] = use_audio_in_video
    labels = seq.input_ids.astype(np.int64).copy()
    labels[seq.attention_mask == 0] = -100
    for name in ("image", "video", "audio"):
        labels[seq.input_ids == TINY_IDS[name]] = -100
    # The first real token of each row is "predicted" from a padding position: mask it (see the reference study).
    first_real = seq.attention_mask.argmax(-1)
    labels[np.arange(len(labels)), first_real] = -100
    inputs["labels"] = labels
    return inputs


def torch_inputs(inputs):
    out = {}
    for k, v in inputs.items():
        if isinstance(v, np.ndarray):
            t = torch.from_numpy(v)
            out[k] = t.float() if v.dtype in (np.float32, np.float64) and k != "video_second_per_grid" else t
        else:
            out[k] = v
    if "video_second_per_grid" in out:
        out["video_second_per_grid"] = torch.tensor(inputs["video_second_per_grid"], dtype=torch.float32)
    for k in ("input_ids", "labels", "image_grid_thw", "video_grid_thw"):
        if k in out:
            out[k] = out[k].long()
    return out


CASES = {
    "text_left_pad": ([[("text", 20)], [("text", 9)]], "left", False),
    "text_right_pad": ([[("text", 20)], [("text", 9)]], "right", False),
    "one_image": ([[("text", 5), ("image", (1, 20, 28)), ("text", 7)]], "left", False),
    "two_images_ragged_windows": (
        [[("text", 3), ("image", (1, 10, 14)), ("text", 4), ("image", (1, 6, 22)), ("text", 5)]],
        "left",
        False,
    ),
    "video": ([[("text", 4), ("video", (4, 12, 16), 1.0), ("text", 6)]], "left", False),
    "audio_partial_chunk": ([[("text", 4), ("audio", 450), ("text", 5)]], "left", False),
    "video_with_audio": ([[("text", 4), ("av", (4, 8, 12), 1.0, 330), ("text", 6)]], "left", True),
    "mixed_batch": (
        [
            [("text", 3), ("image", (1, 6, 10)), ("audio", 250), ("text", 6)],
            [("text", 5), ("video", (2, 8, 8), 0.5), ("text", 9)],
        ],
        "left",
        False,
    ),
}


@pytest.fixture(scope="module")
def models(hf_tiny, tmp_path_factory):
    path = save_hf_thinker(hf_tiny, tmp_path_factory.mktemp("tiny_hf") / "thinker")
    return hf_tiny, Qwen2_5OmniThinker.from_pretrained(path)


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_loss_match_transformers(models, case):
    hf, ours = models
    rows, side, av = CASES[case]
    inputs = make_case(rows, padding_side=side, use_audio_in_video=av)
    with torch.no_grad():
        ref = hf(**torch_inputs(inputs))
    out = ours(**inputs)
    valid = inputs["attention_mask"].astype(bool)
    assert_rel_close(out.logits.asnumpy()[valid], ref.logits.numpy()[valid], 1e-5, "logits")
    assert_rel_close(out.loss.asnumpy(), ref.loss.numpy(), 1e-5, "loss")


def test_gradients_match_transformers(models):
    hf, ours = models
    rows, side, av = CASES["mixed_batch"]
    inputs = make_case(rows, padding_side=side, use_audio_in_video=av, seed=3)
    hf.zero_grad()
    hf(**torch_inputs(inputs)).loss.backward()
    ref_grads = {k: p.grad.numpy() for k, p in hf.named_parameters() if p.grad is not None}
    hf.zero_grad()

    batch = ours.prepare_batch(**inputs)
    params = ours.trainable_params()
    names = {id(p): n for n, p in ours.parameters_and_names()}

    def loss_fn(*args):
        return ours.compute(*args)[1]

    _, grads = ms.value_and_grad(loss_fn, None, params)(*batch.arguments())
    checked = 0
    for p, g in zip(params, grads):
        name = names[id(p)]
        if name not in ref_grads:  # transformers leaves unused tensors (audio_bos_eos_token) without a grad
            assert np.abs(g.asnumpy()).max() == 0, name
            continue
        assert_rel_close(g.asnumpy(), ref_grads[name], 1e-4, name)
        checked += 1
    assert checked == len(ref_grads)


def test_hub_layout_sharded_and_prefixed(hf_tiny, tmp_path):
    path = save_hf_thinker(hf_tiny, tmp_path / "hub", full=True, shards=3)
    ours = Qwen2_5OmniThinker.from_pretrained(path)
    want = {k: v.numpy() for k, v in hf_tiny.state_dict().items()}
    got = {n: p.asnumpy() for n, p in ours.parameters_and_names()}
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_bfloat16_checkpoint_loads_bit_exactly(hf_tiny, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(dispatch, "_warned", set())  # the notice is once per process; this test wants to see it
    path = save_hf_thinker(hf_tiny, tmp_path / "bf16", dtype="bfloat16")
    with caplog.at_level("WARNING"):
        ours = Qwen2_5OmniThinker.from_pretrained(path, dtype="bfloat16")
    for name, p in ours.parameters_and_names():
        assert p.dtype == ms.bfloat16, name
        want = hf_tiny.state_dict()[name].to(torch.bfloat16).view(torch.int16).numpy()
        got = p.astype(ms.float32).asnumpy().view(np.int32) >> 16
        np.testing.assert_array_equal(got.astype(np.int16), want, err_msg=name)
    # On CPU the bf16 model computes in float32, says so, and equals a float32 model of the same (rounded) weights.
    assert ours.compute_dtype == ms.float32
    assert any("compute runs in float32" in r.getMessage() for r in caplog.records)
    as_fp32 = Qwen2_5OmniThinker.from_pretrained(path, dtype="float32")
    inputs = make_case(CASES["mixed_batch"][0])
    np.testing.assert_array_equal(ours(**inputs).logits.asnumpy(), as_fp32(**inputs).logits.asnumpy())


def test_checkpoint_mismatches_are_listed(hf_tiny, tmp_path):
    path = save_hf_thinker(hf_tiny, tmp_path / "bad")
    cfg = json.loads((path / "config.json").read_text())
    cfg["text_config"]["num_hidden_layers"] = 3
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"missing from the checkpoint \(12\).*model\.layers\.2\."):
        Qwen2_5OmniThinker.from_pretrained(path)
    cfg["text_config"]["num_hidden_layers"] = 2
    cfg["text_config"]["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"wrong shape.*mlp\.down_proj\.weight"):
        Qwen2_5OmniThinker.from_pretrained(path)


def test_placeholder_count_mismatch_raises(models):
    _, ours = models
    inputs = make_case(CASES["one_image"][0])
    inputs["image_grid_thw"] = np.array([[1, 20, 24]])
    inputs["pixel_values"] = inputs["pixel_values"][: 20 * 24]
    with pytest.raises(ValueError, match="image: input_ids hold 140 placeholder tokens"):
        ours(**inputs)


def test_attention_mask_with_a_hole_is_rejected(models):
    """The text attention needs each row's tokens in one run; a mask with a hole would otherwise be attended as if
    the hole were tokens. Left/right padding and fully padded rows pass."""
    _, ours = models
    ids = np.full((3, 8), 5, np.int64)
    ok = np.array([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0, 0], [0] * 8])
    ours.prepare_batch(ids, ok)
    holed = ok.copy()
    holed[1] = [1, 1, 0, 1, 1, 0, 1, 0]
    with pytest.raises(ValueError, match=r"attention_mask row 1 has 3 separate runs of tokens \(starting at "
                                         r"positions \[0, 3, 6\]\)"):  # fmt: skip
        ours.prepare_batch(ids, holed)
