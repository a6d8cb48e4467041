"""Convert LLaVA-Instruct-150K (``llava_instruct_150k.json``) to the mllm format the guide trains on.

    python -m omni_fast.data.llava_to_mllm --llava-json ./data/llava_instruct_150k.json \\
        --coco-root ./data/COCO2017 --output ./data/mllm_format_llava_instruct_data.json

Output, as MindSpeed-MM's ``llava_instruct_2_mllm_demo_format.py`` writes it: one JSON array (not JSONL) of
``{"images": ["./train2017/<file>"] or [], "messages": [{"role": "user"|"assistant", "content": ...}, ...]}``;
``human`` becomes ``user``, ``gpt`` becomes ``assistant`` (any other role is an error), the ``<image>`` placeholder
stays in the text and ``id`` is dropped. Image paths are relative to the COCO root, so the matching data.json sets
``dataset_dir`` to that root (``examples/qwen2.5omni/data_7b.json``).

* A record without ``image`` (or with an empty one) is kept as text-only (``"images": []``).
* A record whose image file is missing is left out, like the reference; the count and the first few ids are reported.
* Records whose ``<image>`` count differs from their image list are reported (training would reject them).
* An existing output is never overwritten; the file appears complete or not at all (written to a temporary name,
  then hard-linked into place, which fails if the name exists).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ConversionReport", "convert_llava", "main"]

ROLES = {"human": "user", "gpt": "assistant"}
IMAGE_PLACEHOLDER = "<image>"


@dataclass
class ConversionReport:
    """What a conversion did. ``missing_ids`` holds the first few ids of records dropped for a missing image."""

    records_in: int = 0
    written: int = 0
    text_only: int = 0
    missing_images: int = 0
    missing_ids: list[Any] = field(default_factory=list)
    placeholder_mismatch: int = 0
    mismatch_ids: list[Any] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self, output: str | os.PathLike) -> str:
        lines = [
            f"wrote {self.written} of {self.records_in} records ({self.text_only} text-only) to {output} "
            f"in {self.seconds:.1f} s"
        ]
        if self.missing_images:
            lines.append(
                f"left out {self.missing_images} records whose image file is missing, e.g. ids {self.missing_ids}"
            )
        if self.placeholder_mismatch:
            lines.append(
                f"warning: {self.placeholder_mismatch} records have a {IMAGE_PLACEHOLDER} count different from their "
                f"image list (training rejects them), e.g. ids {self.mismatch_ids}"
            )
        return "\n".join(lines)


class _FileIndex:
    """Existence checks by listing each image directory once (fast on network file systems)."""

    def __init__(self) -> None:
        self._dirs: dict[str, frozenset[str]] = {}

    def exists(self, path: str) -> bool:
        parent, name = os.path.split(path)
        if parent not in self._dirs:
            try:
                self._dirs[parent] = frozenset(e.name for e in os.scandir(parent or ".") if e.is_file())
            except OSError:
                self._dirs[parent] = frozenset()
        return name in self._dirs[parent]


def convert_llava(
    llava_json: str | os.PathLike,
    coco_root: str | os.PathLike,
    output: str | os.PathLike,
    *,
    image_dir: str = "train2017",
    keep_ids: int = 5,
) -> ConversionReport:
    """Convert ``llava_json`` to the mllm format at ``output`` (which must not exist); see the module doc."""
    start = time.perf_counter()
    output = Path(output)
    if output.exists():
        raise FileExistsError(f"{output} already exists; remove or rename it first (it is never overwritten)")
    try:
        with open(llava_json, encoding="utf-8") as f:
            records = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{llava_json}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(records, list):
        raise ValueError(f"{llava_json}: expected a JSON array of records, got {type(records).__name__}")

    report = ConversionReport(records_in=len(records))
    files = _FileIndex()
    out: list[dict] = []
    for index, item in enumerate(records):
        where = f"{llava_json}#{index}"
        if not isinstance(item, dict) or not isinstance(item.get("conversations"), list):
            raise ValueError(f"{where}: a LLaVA record needs a 'conversations' list, got {item!r:.200}")
        record_id = item.get("id", index)
        image = item.get("image")
        if image:
            if not isinstance(image, str):
                raise ValueError(f"{where} (id {record_id!r}): 'image' must be a file name, got {image!r}")
            rel = f"./{image_dir}/{image}" if image_dir else f"./{image}"
            if not files.exists(os.path.join(coco_root, rel)):
                report.missing_images += 1
                if len(report.missing_ids) < keep_ids:
                    report.missing_ids.append(record_id)
                continue
            images = [rel]
        else:
            images = []
            report.text_only += 1
        messages = []
        for turn_index, turn in enumerate(item["conversations"]):
            role = ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
            if role is None or not isinstance(turn.get("value"), str):
                raise ValueError(
                    f"{where} (id {record_id!r}): turn {turn_index} must have 'from' in {sorted(ROLES)} and a string "
                    f"'value', got {turn!r:.200}"
                )
            messages.append({"role": role, "content": turn["value"]})
        if sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages) != len(images):
            report.placeholder_mismatch += 1
            if len(report.mismatch_ids) < keep_ids:
                report.mismatch_ids.append(record_id)
        out.append({"images": images, "messages": messages})
    report.written = len(out)

    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(out, ensure_ascii=False))  # dumps uses the C encoder, dump does not
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the output is an ordinary data file
        try:
            os.link(tmp, output)  # atomic, and fails instead of overwriting a file created meanwhile
        except FileExistsError:
            raise FileExistsError(f"{output} appeared while converting; it was not overwritten") from None
    finally:
        os.unlink(tmp)
    report.seconds = time.perf_counter() - start
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m omni_fast.data.llava_to_mllm",
        description="Convert llava_instruct_150k.json to the mllm format (images + messages).",
    )
    # the reference script's underscore spellings are accepted too
    parser.add_argument("--llava-json", "--llava_json_path", default="./data/llava_instruct_150k.json")
    parser.add_argument("--coco-root", "--coco_path", default="./data/COCO2017", help="folder holding train2017/")
    parser.add_argument("--output", "--output_json_path", default="./data/mllm_format_llava_instruct_data.json")
    parser.add_argument("--image-dir", default="train2017", help="image folder under the COCO root")
    args = parser.parse_args(argv)
    try:
        report = convert_llava(args.llava_json, args.coco_root, args.output, image_dir=args.image_dir)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report.summary(args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
