"""Turn a ``--benchmark-json`` file of this suite into the markdown of RESULTS.md.

Usage (from the repo root)::

    python -m pytest bench/ --benchmark-json=bench/results.json
    python bench/report.py bench/results.json > bench/RESULTS.md

Each benchmark's ``extra_info`` carries ``impl`` (its row label), ``compare`` (ratio label -> impl of the same
group), raw quantities per call (``bytes`` of compulsory traffic, model ``flops``, ``tokens``), ``details``
(other numbers worth a column), and optionally ``note`` (printed under the group's table) and ``headline`` (also
listed in the summary at the top). :func:`add_derived` turns them into ``ratios`` and ``metrics``; the conftest
runs it when the JSON is written, and this script again (same result) before rendering. Standard library only,
so it runs anywhere the JSON is.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from typing import Any


def _best_measured(doc: dict[str, Any], yardstick: str, key: str) -> float | None:
    """A yardstick's best figure over the run's measurements of it (start and end of the session), if any."""
    runs = doc.get("omni_fast", {}).get(yardstick, [])
    return max((run[key] for run in runs if key in run), default=None)


def peak_gflops(doc: dict[str, Any]) -> float | None:
    """The run's GEMM peak (best torch/numpy 2048^3 matmul)."""
    return _best_measured(doc, "gemm", "peak_gflops")


def fma_ceiling(doc: dict[str, Any]) -> float | None:
    """The run's fp32 FMA ceiling (multiply-add chains on every core); older runs did not measure it."""
    return _best_measured(doc, "gemm", "fma_ceiling_gflops")


def copy_gbs(doc: dict[str, Any]) -> float | None:
    """The run's copy bandwidth (best large-array copy)."""
    return _best_measured(doc, "copy", "best_gbs")


def add_derived(doc: dict[str, Any]) -> None:
    """Fill each benchmark's ``extra_info`` with the numbers derived from this run's minima (idempotent).

    * ``ratios[label]`` = min time of the compared impl (same group) / min time of this one; above 1 = this row is
      faster. Minima, not means: the machine is shared and noise only ever adds time.
    * ``metrics``: from ``bytes`` -> GB/s and % of the copy bandwidth; from ``flops`` -> GFLOP/s, % of the GEMM
      peak and % of the FMA ceiling; from ``tokens`` -> tokens/s; then whatever the benchmark put in ``details``.
    """
    benchmarks = doc["benchmarks"]
    peak, ceiling, bandwidth = peak_gflops(doc), fma_ceiling(doc), copy_gbs(doc)
    minima = {(b["group"], b["extra_info"].get("impl")): b["stats"]["min"] for b in benchmarks}
    for bench in benchmarks:
        info, best = bench["extra_info"], bench["stats"]["min"]
        ratios = {}
        for label, other in info.get("compare", {}).items():
            other_min = minima.get((bench["group"], other))
            if other_min is not None:
                ratios[label] = other_min / best
        if ratios:
            info["ratios"] = ratios
        metrics: dict[str, float] = {}
        if "tokens" in info:
            metrics["tokens/s"] = info["tokens"] / best
        if "bytes" in info:
            metrics["GB/s"] = info["bytes"] / best / 1e9
            if bandwidth:
                metrics["% of copy BW"] = 100 * metrics["GB/s"] / bandwidth
        if "flops" in info:
            metrics["GFLOP/s"] = info["flops"] / best / 1e9
            if peak:
                metrics["% of GEMM peak"] = 100 * metrics["GFLOP/s"] / peak
            if ceiling:
                metrics["% of FMA ceiling"] = 100 * metrics["GFLOP/s"] / ceiling
        info["metrics"] = {**metrics, **info.get("details", {})}


def _num(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 0.1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _ratio(value: float) -> str:
    return f"**{value:.2f}x**" if value >= 1 else f"{value:.2f}x"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _speedups(info: dict[str, Any]) -> list[tuple[str, float]]:
    """The row's ratios from the run's minima, then those the benchmark measured itself (``details`` keys starting
    with "vs ", e.g. alternating calls of both implementations)."""
    measured = [(k, v) for k, v in info.get("details", {}).items() if k.startswith("vs ") and isinstance(v, float)]
    return list(info["ratios"].items()) + measured


def _machine_lines(doc: dict[str, Any]) -> list[str]:
    extra = doc.get("omni_fast", {})
    m = extra.get("machine", {})
    if not m:
        cpu = doc["machine_info"].get("cpu", {}).get("brand_raw", "unknown")
        return [f"- {cpu} (the omni_fast session fixtures did not run)"]
    flags = ", ".join(f"{name} {'yes' if present else 'no'}" for name, present in m["flags"].items())
    versions = ", ".join(f"{name} {version}" for name, version in m["versions"].items())
    build = m["omni_fast_build_info"]
    threads = ", ".join(f"{name}: {value}" for name, value in m["threads"].items())
    return [
        f"- **CPU**: {m['cpu_model']} at {m['cpu_mhz']} MHz (nominal, from /proc/cpuinfo), {m['physical_cores']} "
        f"physical cores / {m['logical_cpus']} logical CPUs ({m['usable_cpus']} usable); {flags}",
        f"- **RAM**: {m['ram_gib']} GiB; **OS**: {m['os']}; **Python** {m['python']}",
        f"- **Software**: {versions}",
        f"- **omni_fast kernels built with** `{build['arch_flags']}`, detected {build['cpu_features']}, "
        f"OpenMP threads {build['openmp_max_threads']}",
        f"- **Threads**: {threads}",
        f"- **Load average** (1/5/15 min) at start {' / '.join(m['loadavg_at_start'])}, at end "
        f"{' / '.join(extra.get('loadavg_at_end', ['?'] * 3))} (2 cores; includes this run): the machine is "
        "shared with other jobs, hence minima",
    ]


def _yardstick_lines(doc: dict[str, Any]) -> list[str]:
    extra = doc.get("omni_fast", {})
    lines = []
    for run in extra.get("gemm", []):
        parts = ", ".join(f"{name} {_num(v)}" for name, v in run["gflops"].items())
        lines.append(
            f"- fp32 GEMM {run['n']}x{run['n']}x{run['n']}, all threads, best of {run['repeats']}, at the session "
            f"{run['when']} (other processes busy {100 * run.get('cpu_busy_before', float('nan')):.0f}% of the CPUs "
            f"just before): {parts} GFLOP/s"
        )
    if peak_gflops(doc):
        lines.append(f"- **GEMM peak used below: {_num(peak_gflops(doc))} GFLOP/s** (best torch/numpy figure above)")
    for run in extra.get("gemm", []):
        if "fma_ceiling_gflops" in run:
            lines.append(
                f"- fp32 FMA ceiling at the session {run['when']}: {_num(run['fma_ceiling_gflops'])} GFLOP/s "
                "(independent multiply-add chains on every core, nothing loaded: `omni_fast._C.fma_peak_gflops`)"
            )
    if fma_ceiling(doc):
        lines.append(
            f"- **FMA ceiling used below: {_num(fma_ceiling(doc))} GFLOP/s**; no GEMM or training step can pass it"
        )
    for run in extra.get("copy", []):
        parts = ", ".join(f"{name} {_num(v)}" for name, v in run["gbs"].items())
        lines.append(
            f"- Copy of a {run['mib']} MiB fp32 array (read + write counted; the RMSNorm tensors are 56-80 MiB), "
            f"at the session {run['when']} (others busy {100 * run.get('cpu_busy_before', float('nan')):.0f}%): "
            f"{parts} GB/s"
        )
    if copy_gbs(doc):
        lines.append(f"- **Copy bandwidth used below: {_num(copy_gbs(doc))} GB/s**")
    return lines


def _group_table(members: list[dict[str, Any]]) -> list[str]:
    ratio_labels = list(dict.fromkeys(label for b in members for label in b["extra_info"].get("ratios", {})))
    metric_labels = list(dict.fromkeys(label for b in members for label in b["extra_info"].get("metrics", {})))
    header = ["implementation", "min ms", "median ms", "rounds", *ratio_labels, *metric_labels]
    rows = []
    for b in members:
        info, stats = b["extra_info"], b["stats"]
        ratios, metrics = info.get("ratios", {}), info.get("metrics", {})
        rows.append(
            [info.get("impl", b["name"]), _num(stats["min"] * 1e3), _num(stats["median"] * 1e3), str(stats["rounds"])]
            + [_ratio(ratios[label]) if label in ratios else "" for label in ratio_labels]
            + [_num(metrics[label]) if label in metrics else "" for label in metric_labels]
        )
    lines = _table(header, rows)
    backends = [
        (b["extra_info"].get("impl", b["name"]), b["extra_info"]["backends"])
        for b in members
        if b["extra_info"].get("backends")
    ]
    if backends:
        lines += ["", "Op backends: " + "; ".join(f"*{impl}*: {used}" for impl, used in backends) + "."]
    return lines


def render(doc: dict[str, Any]) -> str:
    benchmarks = doc["benchmarks"]
    add_derived(doc)  # idempotent: recomputed from the same minima in case the JSON predates the hook
    when = datetime.fromisoformat(doc["datetime"]).strftime("%Y-%m-%d %H:%M UTC")
    command = doc.get("omni_fast", {}).get("command", "python -m pytest bench/ --benchmark-json=...")
    out = [
        "# omni_fast benchmark results",
        "",
        f"Measured {when}. Generated by `python bench/report.py <json>` from the run `{command}` "
        "(see bench/README.md). Do not edit by hand: rerun and regenerate.",
        "",
        "## Machine",
        "",
        *_machine_lines(doc),
        "",
        "## Yardsticks measured in the same run",
        "",
        *_yardstick_lines(doc),
        "",
        "## How to read the tables",
        "",
        "- Times are per call, in ms: **min** over the timed rounds (noise from other jobs only adds time), median "
        "for spread. Rows wait (up to 10 s) for the other processes to leave the CPUs before timing. *others' CPU "
        "while timed, %*: the share of the CPUs other processes used during the row's timed rounds (each round "
        "also waits up to 2 s for a quiet moment); near 0 = a clean number. *CPU busy before, %*: how busy they "
        "were when the rounds started.",
        "- A **speed-up column** is (min time of the named implementation) / (min time of this row), both from this "
        "run; above 1 means this row is faster. A *..., alternating calls/rounds* ratio comes from the two "
        "implementations timed in alternation right after the row (minimum of each): this VM's speed shifts by up to "
        "~25% for minutes at a time, so rows timed minutes apart can compare different machine states; the "
        "alternating ratio cannot.",
        "- Memory-bound ops are reported in **GB/s** of compulsory traffic (each input read once, each output "
        "written once) and as a fraction of the copy bandwidth above; compute-bound runs as a fraction of the GEMM "
        "peak above (what a good library reaches) and, where the run measured it, of the FMA ceiling (what the cores "
        "can do at all).",
        "",
    ]
    headline = [b for b in benchmarks if b["extra_info"].get("headline") and b["extra_info"].get("ratios")]
    if headline:
        out += ["## Headline ratios", ""]
        rows = [
            [b["group"], b["extra_info"]["impl"], _num(b["stats"]["min"] * 1e3)]
            + ["; ".join(f"{label} {_ratio(v)}" for label, v in _speedups(b["extra_info"]))]
            for b in headline
        ]
        out += _table(["case", "implementation", "min ms", "speed-up"], rows) + [""]

    # Sections (one per benchmark file) hold their note once, then one table per group (case).
    sections: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for bench in benchmarks:
        section = bench["extra_info"].get("section", "Other benchmarks")
        sections.setdefault(section, {}).setdefault(bench["group"] or "(no group)", []).append(bench)
    for section, groups in sections.items():
        out += [f"## {section}", ""]
        members = [b for group in groups.values() for b in group]
        out += [note + "\n" for note in dict.fromkeys(b["extra_info"].get("note") for b in members) if note]
        for group, members in groups.items():
            out += [f"### {group}", "", *_group_table(members), ""]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "json_files", nargs="+", help="files written by pytest --benchmark-json; several runs become one section each"
    )
    args = parser.parse_args(argv)
    sections = []
    for path in args.json_files:
        with open(path) as fh:
            text = render(json.load(fh))
        if len(args.json_files) > 1:  # one run per section: its ratios, machine and yardsticks belong together
            text = text.replace("\n## ", "\n### ").replace("# omni_fast benchmark results", "## Run", 1)
        sections.append(text)
    if len(sections) > 1:
        sections.insert(
            0,
            "# omni_fast benchmark results\n\nOne section per benchmark run: every ratio compares implementations "
            "timed in the same run, next to that run's machine description and yardsticks.\n\n",
        )
    sys.stdout.write("\n".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
