"""The LLaVA-Instruct-150K -> mllm converter: the reference script's output, reports, no overwrite."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from PIL import Image

from omni_fast.data.config import DataConfig
from omni_fast.data.dataset import read_records
from omni_fast.data.llava_to_mllm import convert_llava, main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "qwen2.5omni"

LLAVA = [
    {"id": "000000033471", "image": "000000033471.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
        {"from": "gpt", "value": "The bus in the image is white and red."},
        {"from": "human", "value": "What feature can be seen on the back of the bus?"},
        {"from": "gpt", "value": "The back of the bus features an advertisement."},
    ]},
    {"id": "000000052846", "image": "000000052846.jpg", "conversations": [
        {"from": "human", "value": "Where is the cat positioned?\n<image>"},
        {"from": "gpt", "value": "On top of the back of the couch."},
    ]},
    {"id": "text-1", "conversations": [
        {"from": "human", "value": "Tell me a joke about trains."},
        {"from": "gpt", "value": "It had a one-track mind."},
    ]},
    {"id": "000000000404", "image": "000000000404.jpg", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the scene."},
        {"from": "gpt", "value": "A park."},
    ]},
    {"id": "empty-image", "image": "", "conversations": [
        {"from": "human", "value": "No image here."},
        {"from": "gpt", "value": "Right."},
    ]},
]


@pytest.fixture
def coco(tmp_path):
    root = tmp_path / "COCO2017"
    (root / "train2017").mkdir(parents=True)
    for name in ("000000033471.jpg", "000000052846.jpg"):  # 000000000404.jpg is missing
        Image.new("RGB", (64, 48), (200, 30, 30)).save(root / "train2017" / name)
    (tmp_path / "llava_instruct_150k.json").write_text(json.dumps(LLAVA))
    return root


def test_output_is_the_reference_format(tmp_path, coco):
    out = tmp_path / "mllm_format_llava_instruct_data.json"
    report = convert_llava(tmp_path / "llava_instruct_150k.json", coco, out)
    data = json.loads(out.read_text())
    assert data == [
        {"images": ["./train2017/000000033471.jpg"], "messages": [
            {"role": "user", "content": "<image>\nWhat are the colors of the bus in the image?"},
            {"role": "assistant", "content": "The bus in the image is white and red."},
            {"role": "user", "content": "What feature can be seen on the back of the bus?"},
            {"role": "assistant", "content": "The back of the bus features an advertisement."},
        ]},
        {"images": ["./train2017/000000052846.jpg"], "messages": [
            {"role": "user", "content": "Where is the cat positioned?\n<image>"},
            {"role": "assistant", "content": "On top of the back of the couch."},
        ]},
        {"images": [], "messages": [
            {"role": "user", "content": "Tell me a joke about trains."},
            {"role": "assistant", "content": "It had a one-track mind."},
        ]},
        {"images": [], "messages": [{"role": "user", "content": "No image here."},
                                    {"role": "assistant", "content": "Right."}]},
    ]
    assert (report.records_in, report.written, report.text_only) == (5, 4, 2)
    assert (report.missing_images, report.missing_ids, report.placeholder_mismatch) == (1, ["000000000404"], 0)
    assert "left out 1 records whose image file is missing, e.g. ids ['000000000404']" in report.summary(out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~_umask()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["COCO2017", "llava_instruct_150k.json", "mllm_format_llava_instruct_data.json"]
    )  # no temporary file left


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_output_trains_with_the_example_data_json(tmp_path, coco):
    """The guide's layout: examples/qwen2.5omni/data.json reads the output with dataset_dir = the COCO root."""
    out = tmp_path / "data" / "mllm_format_llava_instruct_data.json"
    convert_llava(tmp_path / "llava_instruct_150k.json", coco, out)
    example = json.loads((EXAMPLES / "data.json").read_text())
    assert example["dataset_param"]["basic_parameters"]["dataset_dir"] == "./data/COCO2017"
    example["dataset_param"]["basic_parameters"].update(dataset_dir=str(coco), dataset=str(out))
    records = read_records(DataConfig.from_dict(example))
    assert len(records) == 4 and records[0].images == (os.path.join(str(coco), "./train2017/000000033471.jpg"),)
    assert records[2].images == () and records[0].messages[0]["role"] == "user"


def test_refuses_to_overwrite(tmp_path, coco, capsys):
    out = tmp_path / "out.json"
    out.write_text("keep me")
    with pytest.raises(FileExistsError, match="already exists"):
        convert_llava(tmp_path / "llava_instruct_150k.json", coco, out)
    assert out.read_text() == "keep me"
    code = main(["--llava-json", str(tmp_path / "llava_instruct_150k.json"), "--coco-root", str(coco),
                 "--output", str(out)])
    assert code == 1 and "already exists" in capsys.readouterr().err and out.read_text() == "keep me"


def test_cli_and_reference_flag_spellings(tmp_path, coco, capsys):
    out = tmp_path / "a.json"
    assert main(["--llava_json_path", str(tmp_path / "llava_instruct_150k.json"), "--coco_path", str(coco),
                 "--output_json_path", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote 4 of 5 records (2 text-only) to {out}" in printed and "000000000404" in printed
    assert len(json.loads(out.read_text())) == 4


def test_bad_records_are_errors_with_their_index(tmp_path, coco):
    bad = LLAVA[:2] + [{"id": "x9", "conversations": [{"from": "system", "value": "?"}]}]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"bad\.json#2 \(id 'x9'\): turn 0 must have 'from' in \['gpt', 'human'\]"):
        convert_llava(tmp_path / "bad.json", coco, tmp_path / "o.json")
    assert not (tmp_path / "o.json").exists()
    (tmp_path / "broken.json").write_text('[{"id": 1,}]')
    with pytest.raises(ValueError, match=r"broken\.json: malformed JSON at line 1 column 11"):
        convert_llava(tmp_path / "broken.json", coco, tmp_path / "o.json")


def test_placeholder_mismatch_is_reported(tmp_path, coco):
    odd = [dict(LLAVA[0], conversations=[{"from": "human", "value": "no placeholder"}, {"from": "gpt", "value": "x"}])]
    (tmp_path / "odd.json").write_text(json.dumps(odd))
    report = convert_llava(tmp_path / "odd.json", coco, tmp_path / "o.json")
    assert (report.written, report.placeholder_mismatch, report.mismatch_ids) == (1, 1, ["000000033471"])
    assert "training rejects them" in report.summary("o.json")
