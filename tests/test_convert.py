"""Weight conversion (mm-convert): byte-exact round trips, the rules against an independent computation, the
compiled engine against its reference and the numpy oracle, validation, and the model loaded from an MM directory."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from safetensors.numpy import save as serialize_numpy_raw
from test_thinker import CASES, make_case
from tiny_omni import build_hf_thinker, save_hf_thinker, tiny_thinker_config_dict

from omni_fast.config.model_config import ThinkerConfig
from omni_fast.convert import ParallelLayout, hf_to_mm, mm_to_hf, read_mm_thinker, write_mm_thinker
from omni_fast.convert import qwen2_5_omni as omni
from omni_fast.convert.cli import main as cli_main
from omni_fast.convert.engine import CopyPlan, Loc, Rect
from omni_fast.convert.safetensors_io import build_header, read_header
from omni_fast.ops.library import host_module

LAYOUTS = {  # (llm, vit, audio): encoders on the first stages, as model.json requires
    "pp1": ([3], [3], [3]),
    "pp2": ([1, 2], [3, 0], [3, 0]),
    "pp3": ([0, 2, 1], [2, 1, 0], [3, 0, 0]),
}


def three_layer_config() -> dict:
    """The tiny config with 3 layers per tower, so that three pipeline stages can each hold layers."""
    cfg = tiny_thinker_config_dict()
    cfg["text_config"]["num_hidden_layers"] = 3
    cfg["vision_config"]["depth"] = 3
    cfg["audio_config"]["encoder_layers"] = 3
    return cfg


@pytest.fixture(scope="module")
def hf_model():
    return build_hf_thinker(three_layer_config(), seed=5)


@pytest.fixture(scope="module")
def hub_bf16(hf_model, tmp_path_factory) -> Path:
    """Hub layout: ``thinker.`` prefix, talker/token2wav tensors, 3 shards with an index, bf16."""
    return save_hf_thinker(hf_model, tmp_path_factory.mktemp("hub") / "Qwen2.5-Omni", full=True, dtype="bfloat16",
                           shards=3)


@pytest.fixture(scope="module")
def hub_fp32(hf_model, tmp_path_factory) -> Path:
    return save_hf_thinker(hf_model, tmp_path_factory.mktemp("hub32") / "Qwen2.5-Omni", full=True, shards=2)


def layout_of(name: str, tp: int) -> ParallelLayout:
    return ParallelLayout.parse(*LAYOUTS[name], tp)


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def assert_same_tree(a: Path, b: Path) -> None:
    assert tree(a) == tree(b)
    for rel in tree(a):
        assert filecmp.cmp(a / rel, b / rel, shallow=False), rel


def tensor_bytes(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    data = path.read_bytes()
    return {n: (e.dtype, e.shape, data[e.begin:e.end]) for n, e in read_header(path).items()}


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("layout_name", sorted(LAYOUTS))
def test_round_trip_is_byte_exact_and_matches_the_oracle(hub_bf16, tmp_path, layout_name, tp):
    layout = layout_of(layout_name, tp)
    mm = tmp_path / "mm"
    report = hf_to_mm(hub_bf16, mm, layout)
    hf_to_mm(hub_bf16, tmp_path / "mm_numpy", layout, backend="numpy")
    assert_same_tree(mm, tmp_path / "mm_numpy")  # compiled == numpy oracle, byte for byte
    assert (mm / "latest_checkpointed_iteration.txt").read_text() == "release"
    suffix = (lambda p: f"_{p:03d}") if layout.pp_size > 1 else (lambda p: "")
    assert tree(mm / "release") == sorted(f"mp_rank_{t:02d}{suffix(p)}/model.safetensors"
                                          for t in range(tp) for p in range(layout.pp_size))
    assert sorted(report.files) == sorted((mm / "release").rglob("model.safetensors"))

    back = tmp_path / "back"
    mm_to_hf(mm, hub_bf16, back, layout)
    mm_to_hf(mm, hub_bf16, tmp_path / "back_numpy", None, backend="numpy")
    assert_same_tree(back, tmp_path / "back_numpy")
    # Every file of the original directory comes back identical: thinker tensors, talker/token2wav, config, index.
    assert_same_tree(back, hub_bf16)
    original = {}
    for f in hub_bf16.glob("*.safetensors"):
        original.update(tensor_bytes(f))
    assert any(n.startswith("talker.") for n in original) and any(n.startswith("token2wav.") for n in original)

    # The in-memory reader gives the same tensors, named like the model's parameters.
    tensors = read_mm_thinker(mm, ThinkerConfig.from_file(hub_bf16 / "config.json"))
    thinker = {n[len("thinker."):]: v for n, v in original.items() if n.startswith("thinker.")}
    assert tensors.keys() == thinker.keys()
    for name, array in tensors.items():
        dtype, shape, data = thinker[name]
        assert (array.dtype.name, array.shape, array.tobytes()) == ("bfloat16", shape, data), name


def test_thinker_only_single_file_fp32(hf_model, tmp_path):
    hf = save_hf_thinker(hf_model, tmp_path / "thinker")  # no prefix, no index, float32
    layout = layout_of("pp2", 2)
    (tmp_path / "mm").mkdir()  # an existing empty output directory is fine
    hf_to_mm(hf, tmp_path / "mm", layout)
    hf_to_mm(hf, tmp_path / "mm_numpy", layout, backend="numpy")
    assert_same_tree(tmp_path / "mm", tmp_path / "mm_numpy")
    mm_to_hf(tmp_path / "mm", hf, tmp_path / "back")
    assert_same_tree(tmp_path / "back", hf)


def test_hf_state_dict_shapes_match_transformers(hf_model):
    cfg = ThinkerConfig.from_dict(three_layer_config())
    want = {k: tuple(v.shape) for k, v in hf_model.state_dict().items()}
    assert omni.hf_thinker_shapes(cfg) == want
    # Every HF tensor feeds exactly one MM tensor; every MM name is unique.
    rules = omni.thinker_rules(cfg)
    used = [h for r in rules for h in r.hf_names]
    assert sorted(used) == sorted(want)
    assert len({r.name for r in rules}) == len(rules)


# ------------------------------------------------------------------ the rules, computed independently


def test_rules_against_an_independent_computation(hub_fp32, hf_model, tmp_path):
    """q/k/v interleave for GQA, the zero audio K bias, GLU and column splits, placement and renumbering."""
    layout = layout_of("pp3", 2)  # llm [0,2,1], vit [2,1,0], audio [3,0,0], tp 2
    hf_to_mm(hub_fp32, tmp_path / "mm", layout)
    ranks = {(t, p): load_file(str(tmp_path / f"mm/release/mp_rank_{t:02d}_{p:03d}/model.safetensors"))
             for t in range(2) for p in range(3)}
    sd = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    hd = 16  # text: hidden 64, 4 heads -> head_dim 16; 2 key-value heads -> 2 query heads per group

    # LLM layer 2 lives on stage 2 as layer 0 (the renumbering); with tp 2 each rank holds one whole GQA group.
    q, k, v = (sd[f"model.layers.2.self_attn.{x}_proj.weight"] for x in "qkv")
    for rank in range(2):
        want = np.concatenate([q[rank * 2 * hd:(rank + 1) * 2 * hd], k[rank * hd:(rank + 1) * hd],
                               v[rank * hd:(rank + 1) * hd]])
        np.testing.assert_array_equal(ranks[rank, 2]["text_decoder.decoder.layers.0.self_attention.linear_qkv.weight"],
                                      want)
    # Layer 1 is on stage 1 as layer 1; its MLP: gate/up halves per rank (GLU), down_proj split by columns.
    gate, up = sd["model.layers.1.mlp.gate_proj.weight"], sd["model.layers.1.mlp.up_proj.weight"]
    down = sd["model.layers.1.mlp.down_proj.weight"]
    for rank in range(2):
        half = slice(rank * 64, (rank + 1) * 64)
        np.testing.assert_array_equal(ranks[rank, 1]["text_decoder.decoder.layers.1.mlp.linear_fc1.weight"],
                                      np.concatenate([gate[half], up[half]]))
        np.testing.assert_array_equal(ranks[rank, 1]["text_decoder.decoder.layers.1.mlp.linear_fc2.weight"],
                                      down[:, half])
    # The embedding is on the LLM's first stage with layers (1), the output layer on its last (2), vocab-split.
    np.testing.assert_array_equal(ranks[1, 1]["text_decoder.embedding.word_embeddings.weight"],
                                  sd["model.embed_tokens.weight"][512:])
    np.testing.assert_array_equal(ranks[0, 2]["text_decoder.output_layer.weight"], sd["lm_head.weight"][:512])
    assert not any(n.startswith("text_decoder") for n in ranks[0, 0])

    # Audio (all on stage 0): per-head [q_h, 0, v_h] bias, head_dim 16, 2 heads -> one head per rank.
    qb, vb = sd["audio_tower.layers.2.self_attn.q_proj.bias"], sd["audio_tower.layers.2.self_attn.v_proj.bias"]
    for rank in range(2):
        h = slice(rank * 16, (rank + 1) * 16)
        bias = ranks[rank, 0]["audio_encoder.encoder.blocks.layers.2.self_attention.linear_qkv.bias"]
        np.testing.assert_array_equal(bias, np.concatenate([qb[h], np.zeros(16, np.float32), vb[h]]))
    assert "audio_encoder.encoder.ln_post.weight" in ranks[1, 0]  # last stage with audio layers: 0

    # Vision: layer 2 is layer 0 of stage 1, where the projector also lives; patch embed on stage 0.
    np.testing.assert_array_equal(ranks[0, 1]["image_encoder.encoder.blocks.layers.0.pre_mlp_layernorm.weight"],
                                  sd["visual.blocks.2.norm2.weight"])
    assert "image_encoder.projector.layernorm.weight" in ranks[0, 1]
    assert "image_encoder.encoder.patch_embed.proj.weight" in ranks[1, 0]


# ------------------------------------------------------------------ the model from an MM directory


def test_model_from_mm_dir_gives_the_same_logits(hub_fp32, tmp_path):
    from omni_fast.model import Qwen2_5OmniThinker
    from omni_fast.model.loading import load_mm_state_into

    hf_to_mm(hub_fp32, tmp_path / "mm", layout_of("pp2", 2))
    from_hf = Qwen2_5OmniThinker.from_pretrained(hub_fp32)
    from_mm = Qwen2_5OmniThinker(ThinkerConfig.from_file(hub_fp32 / "config.json"))
    load_mm_state_into(from_mm, tmp_path / "mm")
    inputs = make_case(CASES["mixed_batch"][0])
    np.testing.assert_array_equal(from_mm(**inputs).logits.asnumpy(), from_hf(**inputs).logits.asnumpy())


# ------------------------------------------------------------------ the trainer's reader and writer


def test_trainer_writer_matches_hf_to_mm_and_mm_to_hf_reads_it(hub_bf16, tmp_path):
    cfg = ThinkerConfig.from_file(hub_bf16 / "config.json")
    layout = layout_of("pp3", 2)
    hf_to_mm(hub_bf16, tmp_path / "mm", layout)
    state = read_mm_thinker(tmp_path / "mm", cfg)
    save = tmp_path / "save"
    files = write_mm_thinker(state, save / "iter_0000007", cfg, layout)
    assert len(files) == 6
    assert_same_tree(save / "iter_0000007", tmp_path / "mm" / "release")
    # Pipeline ranks save and load their own stages only; together they make the same files.
    per_stage = tmp_path / "per_stage" / "iter_0000007"
    held = {}
    for stage in range(layout.pp_size):
        part = read_mm_thinker(tmp_path / "mm", cfg, stages=[stage])
        held.update({name: stage for name in part})
        write_mm_thinker(part, per_stage, cfg, layout, stages=[stage])
    assert held.keys() == state.keys() and held["model.embed_tokens.weight"] == 1 and held["lm_head.weight"] == 2
    assert_same_tree(per_stage, tmp_path / "mm" / "release")
    with pytest.raises(ValueError, match=r"missing \(1\): model.norm.weight"):
        write_mm_thinker({k: v for k, v in state.items() if held[k] == 2 and k != "model.norm.weight"},
                         tmp_path / "bad", cfg, layout, stages=[2])
    # A trainer checkpoint: other files beside the weights, latest = the iteration number.
    (save / "iter_0000007" / "mp_rank_00_000" / "optimizer.safetensors").write_bytes(b"not read")
    (save / "latest_checkpointed_iteration.txt").write_text("7\n")
    mm_to_hf(save, hub_bf16, tmp_path / "back", ParallelLayout.parse("[0,2,1]", "[2,1,0]", "[3,0,0]", "2"))
    assert_same_tree(tmp_path / "back", hub_bf16)


def test_writer_dtype_change_updates_the_index(hub_bf16, hf_model, tmp_path):
    cfg = ThinkerConfig.from_file(hub_bf16 / "config.json")
    state = {k: v.numpy() for k, v in hf_model.state_dict().items()}  # float32 "master weights"
    write_mm_thinker(state, tmp_path / "save" / "iter_0000001", cfg, layout_of("pp1", 1))
    (tmp_path / "save" / "latest_checkpointed_iteration.txt").write_text("1")
    mm_to_hf(tmp_path / "save", hub_bf16, tmp_path / "back")
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    tensors = {}
    for f in (tmp_path / "back").glob("*.safetensors"):
        tensors.update(read_header(f))
    assert index["metadata"]["total_size"] == sum(e.nbytes for e in tensors.values())
    assert tensors["thinker.lm_head.weight"].dtype == "F32"
    assert tensors["talker.model.embed_tokens.weight"].dtype == "BF16"
    got = read_mm_thinker(tmp_path / "save", cfg)
    for name, value in state.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


# ------------------------------------------------------------------ validation: before any write, naming the field


def _hf_to_mm_error(hf: Path, out: Path, layout: ParallelLayout) -> str:
    with pytest.raises((ValueError, OSError)) as info:
        hf_to_mm(hf, out, layout)
    assert not out.exists() or not any(out.iterdir()), "nothing may be written on a validation error"
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))
    return str(info.value)


def test_validation_errors_name_the_field(hub_bf16, tmp_path):
    out = tmp_path / "mm"
    assert "parallel_config.llm_pp_layers [2, 2] sums to 4" in _hf_to_mm_error(
        hub_bf16, out, ParallelLayout.parse("[[2,2]]", "[[3,0]]", "[[3,0]]"))
    assert "thinker_config.text_config.num_hidden_layers is 3" in _hf_to_mm_error(
        hub_bf16, out, ParallelLayout.parse("[[2,2]]", "[[3,0]]", "[[3,0]]"))
    msg = _hf_to_mm_error(hub_bf16, out, layout_of("pp1", 4))
    assert "tp_size 4 does not divide thinker_config.text_config.num_key_value_heads = 2" in msg
    assert "thinker_config.vision_config.num_heads = 2" in msg and "encoder_attention_heads = 2" in msg
    assert "tp_size 3 does not divide" in _hf_to_mm_error(hub_bf16, out, layout_of("pp1", 3))

    with pytest.raises(ValueError, match="parallel_config.vit_pp_layers has 1 entries but parallel_config.llm_pp"):
        ParallelLayout.parse("[[1,2]]", "[[3]]", "[[3,0]]")
    with pytest.raises(ValueError, match="parallel_config.llm_pp_layers: 2 virtual-pipeline chunks"):
        ParallelLayout.parse("[[1,1],[1,0]]", "[[3,0]]", "[[3,0]]")
    with pytest.raises(ValueError, match="parallel_config.audio_pp_layers: layer counts must be non-negative"):
        ParallelLayout.parse("[3]", "[3]", "[-1]")
    with pytest.raises(ValueError, match="parallel_config.tp_size must be a positive integer"):
        ParallelLayout.parse("[3]", "[3]", "[3]", 0)
    with pytest.raises(ValueError, match="parallel_config.audio_pp_layers has 1 entries"):
        ParallelLayout((1, 2), (3, 0), (3,))  # the constructor checks too, not only the CLI parser

    empty = tmp_path / "empty_hf"
    empty.mkdir()
    assert "cfg.hf_config.hf_dir" in _hf_to_mm_error(empty, out, layout_of("pp1", 1))
    assert "no config.json" in _hf_to_mm_error(empty, out, layout_of("pp1", 1))
    (empty / "config.json").write_text((hub_bf16 / "config.json").read_text())
    assert "no *.safetensors" in _hf_to_mm_error(empty, out, layout_of("pp1", 1))

    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="cfg.mm_dir: .* exists and is not an empty directory"):
        hf_to_mm(hub_bf16, out, layout_of("pp1", 1))
    assert tree(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "user data"


def test_checkpoint_content_errors(hub_fp32, hf_model, tmp_path):
    hf = save_hf_thinker(hf_model, tmp_path / "hf")
    tensors = load_file(str(hf / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    tensors["model.norm.weight"] = np.zeros(5, np.float32)
    (hf / "model.safetensors").unlink()
    (hf / "model.safetensors").write_bytes(serialize_numpy(tensors))
    msg = _hf_to_mm_error(hf, tmp_path / "mm", layout_of("pp1", 1))
    assert "missing (1): model.layers.1.self_attn.k_proj.bias" in msg
    assert "wrong shape (1): model.norm.weight [5] (config: [64])" in msg

    # mm_to_hf: the given layout must be the checkpoint's; the output directory must be empty.
    hf_to_mm(hub_fp32, tmp_path / "mm2", layout_of("pp2", 2))
    with pytest.raises(ValueError, match=r"parallel_config.llm_pp_layers is \[2, 1\], but .* holds \[1, 2\]"):
        mm_to_hf(tmp_path / "mm2", hub_fp32, tmp_path / "back", ParallelLayout.parse("[2,1]", "[3,0]", "[3,0]", 2))
    with pytest.raises(ValueError, match="parallel_config.tp_size is 1, but .* has 2 tensor-parallel"):
        mm_to_hf(tmp_path / "mm2", hub_fp32, tmp_path / "back", layout_of("pp2", 1))
    (tmp_path / "back").mkdir()
    (tmp_path / "back" / "x").write_text("")
    with pytest.raises(FileExistsError, match="cfg.save_hf_dir"):
        mm_to_hf(tmp_path / "mm2", hub_fp32, tmp_path / "back")
    (tmp_path / "mm2" / "latest_checkpointed_iteration.txt").write_text("12")
    with pytest.raises(FileNotFoundError, match="names iter_0000012"):
        mm_to_hf(tmp_path / "mm2", hub_fp32, tmp_path / "back2")


def serialize_numpy(tensors: dict[str, np.ndarray]) -> bytes:
    return serialize_numpy_raw(tensors, metadata={"format": "pt"})


def test_a_crash_mid_conversion_leaves_no_output(hub_bf16, tmp_path, monkeypatch):
    def crash(self, threads=0, reference=False):
        raise OSError("disk on fire")

    monkeypatch.setattr(CopyPlan, "run", crash)
    with pytest.raises(OSError, match="disk on fire"):
        hf_to_mm(hub_bf16, tmp_path / "mm", layout_of("pp2", 1))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ the command line


def test_cli_round_trip_and_errors(hub_bf16, tmp_path, capsys):
    base = ["Qwen2_5_OmniConverter"]
    assert cli_main(base + ["hf_to_mm", "--cfg.mm_dir", str(tmp_path / "mm"), "--cfg.hf_config.hf_dir", str(hub_bf16),
                            "--cfg.parallel_config.llm_pp_layers", "[[1,2]]",
                            "--cfg.parallel_config.vit_pp_layers", "[[3,0]]",
                            "--cfg.parallel_config.audio_pp_layers", "[[3,0]]",
                            "--cfg.parallel_config.tp_size", "2"]) == 0
    assert cli_main(base + ["mm_to_hf", "--cfg.save_hf_dir", str(tmp_path / "back"), "--cfg.mm_dir",
                            str(tmp_path / "mm"), "--cfg.hf_config.hf_dir", str(hub_bf16),
                            "--cfg.parallel_config.llm_pp_layers", "[1,2]",
                            "--cfg.parallel_config.vit_pp_layers", "[3,0]",
                            "--cfg.parallel_config.audio_pp_layers", "[3,0]",
                            "--cfg.parallel_config.tp_size", "2", "--threads", "1"]) == 0
    assert_same_tree(tmp_path / "back", hub_bf16)
    assert "mm-convert mm_to_hf: wrote 3 safetensors files" in capsys.readouterr().out

    assert cli_main(base + ["hf_to_mm", "--cfg.mm_dir", str(tmp_path / "mm3"), "--cfg.hf_config.hf_dir",
                            str(hub_bf16), "--cfg.parallel_config.llm_pp_layers", "[[3]]",
                            "--cfg.parallel_config.vit_pp_layers", "[[3]]",
                            "--cfg.parallel_config.audio_pp_layers", "[[2]]"]) == 1
    assert "parallel_config.audio_pp_layers [2] sums to 2" in capsys.readouterr().err
    assert not (tmp_path / "mm3").exists()


@pytest.mark.parametrize("verb", ["hf_to_mm", "mm_to_hf"])
def test_cli_help_explains_every_field(verb, capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["Qwen2_5_OmniConverter", verb, "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    fields = ["--cfg.mm_dir", "--cfg.hf_config.hf_dir", "--cfg.parallel_config.llm_pp_layers",
              "--cfg.parallel_config.vit_pp_layers", "--cfg.parallel_config.audio_pp_layers",
              "--cfg.parallel_config.tp_size", "--backend", "--threads"]
    fields += ["--cfg.save_hf_dir"] if verb == "mm_to_hf" else []
    for field in fields:
        assert field in text
    assert "key-value heads" in text and "pipeline_num_layers" in text


# ------------------------------------------------------------------ the engine and the header writer


def test_header_is_byte_identical_to_the_library():
    import mindspore as ms

    rng = np.random.default_rng(0)
    bf16 = np.dtype(ms.dtype_to_nptype(ms.bfloat16))
    arrays = {
        "b.weight": rng.standard_normal((3, 5)).astype(np.float32),
        "a.bias": rng.standard_normal(7).astype(np.float16),
        "z": rng.standard_normal((2, 2)).astype(np.float32).astype(bf16),
        "ids": rng.integers(0, 9, (4,)).astype(np.int64),
        "empty": np.zeros((0, 3), np.float32),
        "naïve": np.ones(1, np.float32),
    }
    want = serialize_numpy(arrays)
    codes = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64"}
    header, offsets = build_header((n, codes[a.dtype.name], a.shape) for n, a in arrays.items())
    assert want[:len(header)] == header
    for name, a in arrays.items():
        assert want[offsets[name]:offsets[name] + a.nbytes] == a.tobytes(), name


def random_rects(rng, sources, rows, cols, itemsize):
    """A random tiling of a [rows, cols] tensor by rectangles read at random places of the sources (or zeros), and
    the bytes it must produce, computed by numpy slicing."""
    want = np.zeros((rows, cols * itemsize), np.uint8)
    rects, r = [], 0
    while r < rows:
        n, c = int(rng.integers(1, rows - r + 1)), 0
        while c < cols:
            m, src = int(rng.integers(1, cols - c + 1)), int(rng.integers(-1, len(sources)))
            if src >= 0:
                offset, src_cols = int(rng.integers(0, 50)), m + int(rng.integers(0, 5))
                src_rows = (len(sources[src]) - offset) // (src_cols * itemsize)
            if src < 0 or src_rows < n:
                rects.append(Rect(None, 0, 0, r, c, n, m))
            else:
                sr, sc = int(rng.integers(0, src_rows - n + 1)), int(rng.integers(0, src_cols - m + 1))
                rects.append(Rect(Loc(src, offset, src_cols, itemsize), sr, sc, r, c, n, m))
                block = np.frombuffer(sources[src], np.uint8)[offset:offset + src_rows * src_cols * itemsize]
                block = block.reshape(src_rows, -1)[sr:sr + n, sc * itemsize:(sc + m) * itemsize]
                want[r:r + n, c * itemsize:(c + m) * itemsize] = block
            c += m
        r += n
    return rects, want.reshape(-1)


@pytest.mark.parametrize("trial", range(6))
def test_engine_fast_path_equals_reference_and_numpy(tmp_path, monkeypatch, trial):
    import omni_fast.convert.engine as engine

    monkeypatch.setattr(engine, "UNIT_BYTES", 256)  # many units and row bands even on small tensors
    rng = np.random.default_rng(trial)
    sources = [rng.integers(0, 256, int(rng.integers(500, 4000)), dtype=np.uint8).tobytes() for _ in range(3)]
    header = rng.integers(0, 256, 13, dtype=np.uint8).tobytes()
    tensors = [(int(rng.integers(1, 40)), int(rng.integers(1, 30)), int(rng.choice([1, 2, 4]))) for _ in range(2)]
    tilings = [random_rects(rng, sources, *t) for t in tensors]
    want = header + b"".join(w.tobytes() for _, w in tilings)
    for sink_kind in ("memory", "file"):
        for reference in (False, True):
            plan = CopyPlan()
            assert [plan.source(s) for s in sources] == [0, 1, 2]
            out = tmp_path / f"{sink_kind}_{reference}.bin" if sink_kind == "file" else np.zeros(len(want), np.uint8)
            sink = plan.sink(out, len(want))
            plan.add_bytes(sink, 0, header)
            offset = len(header)
            for (rows, cols, itemsize), (rects, w) in zip(tensors, tilings):
                plan.add_tensor(sink, offset, (rows, cols), itemsize, rects)
                offset += w.nbytes
            plan.run(threads=2, reference=reference)
            got = out.read_bytes() if sink_kind == "file" else out.tobytes()
            assert got == want, (sink_kind, reference)


def test_engine_big_units_from_a_mapped_file(tmp_path):
    """Units of several writes (> 256 KiB each) read from a memory-mapped file: a straight run and a column slice."""
    rng = np.random.default_rng(7)
    data = rng.integers(0, 256, 3 << 20, dtype=np.uint8)
    (tmp_path / "src.bin").write_bytes(data.tobytes())
    plan = CopyPlan()
    src = plan.source(tmp_path / "src.bin")
    rows, cols = 1024, 768  # 1024 x 768 float32 = 3 MiB; keep columns 256..767 (2 MiB) as the second tensor
    size = 5 + (1 << 20) + rows * 512 * 4
    sink = plan.sink(tmp_path / "out.bin", size)
    plan.add_bytes(sink, 0, b"head!")
    plan.add_tensor(sink, 5, (256, 1024), 4, [Rect(Loc(src, 0, 1024, 4), 0, 0, 0, 0, 256, 1024)])
    plan.add_tensor(sink, 5 + (1 << 20), (rows, 512), 4, [Rect(Loc(src, 0, cols, 4), 0, 256, 0, 0, rows, 512)])
    plan.run(threads=2)
    want = b"head!" + data[: 1 << 20].tobytes() + data.reshape(rows, cols * 4)[:, 1024:].tobytes()
    assert (tmp_path / "out.bin").read_bytes() == want


def test_engine_rejects_bad_plans(tmp_path):
    c = host_module()
    src = np.arange(64, dtype=np.uint8)
    out = np.zeros(16, np.uint8)
    units = np.array([[0, 0, 16, 0, 1]], np.int64)
    good = np.array([[0, 0, 16, 0, 16, 1, 16]], np.int64)
    c.convert_copy([src], [(out, 16)], units, good)
    np.testing.assert_array_equal(out, src[:16])
    for bad, message in (
        ([[0, 60, 16, 0, 16, 1, 16]], "source bytes outside the source"),
        ([[0, 0, 8, 0, 8, 1, 8]], "do not add up"),
        ([[3, 0, 16, 0, 16, 1, 16]], "source index out of range"),
        ([[0, 0, 16, 4, 16, 1, 16]], "destination outside its unit"),
    ):
        with pytest.raises(ValueError, match=message):
            c.convert_copy([src], [(out, 16)], units, np.array(bad, np.int64))
    with pytest.raises(ValueError, match="units leave a gap"):
        c.convert_copy([src], [(out, 16)], np.array([[0, 4, 16, 0, 1]], np.int64),
                       np.array([[0, 0, 12, 4, 12, 1, 12]], np.int64))
    existing = tmp_path / "exists.bin"
    existing.write_bytes(b"x")
    with pytest.raises(OSError, match="cannot create"):
        c.convert_copy([src], [(str(existing), 16)], units, good)
    assert existing.read_bytes() == b"x"
    with pytest.raises(OSError, match="cannot open"):
        c.convert_copy([str(tmp_path / "missing.safetensors")], [(out, 16)], units, good)


def test_units_are_aligned_windows_that_tile_each_sink(monkeypatch):
    import omni_fast.convert.engine as engine

    monkeypatch.setattr(engine, "UNIT_BYTES", 64)
    plan = CopyPlan()
    src = plan.source(bytes(range(256)) * 4)
    sink = plan.sink(bytearray(300), 300)
    plan.add_bytes(sink, 0, b"h" * 20)
    plan.add_tensor(sink, 20, (10, 7), 4, [Rect(Loc(src, 3, 9, 4), 1, 2, 0, 0, 10, 7)])  # strided rows of 28 bytes
    units, pieces = plan.units()
    assert units[:, 1].tolist() == [0, 64, 128, 192, 256] and units[:, 2].tolist() == [64, 128, 192, 256, 300]
    for _, begin, end, first, last in units:
        spans = sorted((p[3], p[3] + (p[5] - 1) * p[4] + p[6]) for p in pieces[first:last])
        assert all(begin <= a and b <= end for a, b in spans)
        assert sum(int(p[5] * p[6]) for p in pieces[first:last]) == end - begin
