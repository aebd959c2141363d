"""Turns the pytest-benchmark JSON into Markdown tables and target checks.

usage: python -m benchmarks.report [engine.json [engine.md]]  (from the repository root)
(defaults: benchmarks/results/engine.json -> benchmarks/results/engine.md)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 1 << 20
RATES = ["unthrottled", "700MBps"]
LABELS = {
    "cat": "cat + sync", "dd": "dd conv=fdatasync", "dd-direct": "dd oflag=direct",
    "zstd-T2": "zstd -1 -T2", "zstd-T1": "zstd -1 -T1",
    "fastsave-raw": "fastsave raw", "fastsave-raw-direct": "fastsave raw+direct",
    "fastsave-zstd": "fastsave zstd", "fastsave-zstd-direct": "fastsave zstd+direct",
    "fastsave-auto": "fastsave auto", "fastsave-auto-direct": "fastsave auto+direct",
}

Row = dict[str, Any]


def load(path: Path) -> tuple[dict[str, dict[str, Row]], list[Row]]:
    """Returns {rate: {contender: row}} and the memory rows."""
    saves: dict[str, dict[str, Row]] = {r: {} for r in RATES}
    memory: list[Row] = []
    for b in json.loads(path.read_text())["benchmarks"]:
        row = {**b["extra_info"], "median": b["stats"]["median"], **b["params"]}
        if b["name"].startswith("test_save["):
            saves.setdefault(row["rate"], {})[row["contender"]] = row
        elif b["name"].startswith("test_memory_scaling["):
            memory.append(row)
    return saves, memory


def fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def rate_table(rows: dict[str, Row]) -> list[str]:
    out = ["| contender | median s | MB/s | image/stream | peak RSS MiB | producer s "
           "| tail s | producer_blocked s | output_wait s | worker_cpu s | chunks zstd/stored "
           "| other CPU s |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in [n for n in LABELS if n in rows] + [n for n in rows if n not in LABELS]:
        r = rows[name]
        rss = r.get("peak_rss_kib")
        fs = "producer_blocked" in r
        chunks = f"{r['chunks_compressed']:.0f}/{r['chunks_stored']:.0f}" if fs else "-"
        out.append(
            f"| {LABELS.get(name, name)} | {r['median']:.3f} | {r['mb_per_s']:.0f} "
            f"| {r['size_ratio']:.3f} | {fmt(rss / 1024 if rss else None, '.1f')} "
            f"| {r['producer_seconds']:.3f} | {fmt(r.get('tail_seconds'), '.3f')} "
            f"| {fmt(r.get('producer_blocked'), '.3f')} "
            f"| {fmt(r.get('output_wait'), '.3f')} | {fmt(r.get('worker_cpu'), '.3f')} "
            f"| {chunks} | {fmt(r.get('other_cpu_seconds'), '.2f')} |")
    return out


def ratio(rows: dict[str, Row], a: str, b: str, key: str) -> float | None:
    if a not in rows or b not in rows:
        return None
    return rows[a][key] / rows[b][key]


def ratios(saves: dict[str, dict[str, Row]]) -> list[str]:
    specs = [
        ("fastsave raw+direct / dd oflag=direct throughput", "fastsave-raw-direct", "dd-direct", "mb_per_s"),
        ("fastsave zstd / zstd -1 -T1 throughput", "fastsave-zstd", "zstd-T1", "mb_per_s"),
        ("fastsave zstd+direct / zstd -1 -T1 throughput", "fastsave-zstd-direct", "zstd-T1", "mb_per_s"),
        ("fastsave auto time / raw+direct time", "fastsave-auto", "fastsave-raw-direct", "median"),
        ("fastsave auto+direct time / raw+direct time", "fastsave-auto-direct", "fastsave-raw-direct", "median"),
        ("fastsave auto image / raw image", "fastsave-auto", "fastsave-raw", "out_bytes"),
        ("fastsave auto+direct image / raw+direct image", "fastsave-auto-direct", "fastsave-raw-direct", "out_bytes"),
    ]
    out = ["| ratio | " + " | ".join(RATES) + " |", "|---|" + "---:|" * len(RATES)]
    for label, a, b, key in specs:
        out.append(f"| {label} | " + " | ".join(fmt(ratio(saves[r], a, b, key), ".3f")
                                                for r in RATES) + " |")
    return out


def check(label: str, value: float | None, limit: float, at_least: bool) -> str:
    if value is None:
        return f"SKIP {label}: no data"
    ok = value >= limit if at_least else value <= limit
    margin = (value / limit - 1) if at_least else (1 - value / limit)
    op = ">=" if at_least else "<="
    return f"{'PASS' if ok else 'MISS'} {label}: {value:.3f} (target {op} {limit}, margin {margin:+.1%})"


def targets(saves: dict[str, dict[str, Row]]) -> list[str]:
    u, t = saves["unthrottled"], saves["700MBps"]
    lines = [
        check("unthrottled: raw+O_DIRECT throughput / dd oflag=direct",
              ratio(u, "fastsave-raw-direct", "dd-direct", "mb_per_s"), 0.9, True),
    ]
    for v in ("zstd", "zstd-direct"):
        lines.append(check(f"unthrottled: {v.replace('-', '+')} throughput / zstd -1 -T1",
                           ratio(u, f"fastsave-{v}", "zstd-T1", "mb_per_s"), 1.5, True))
    for rate in RATES:
        for v in ("auto", "auto-direct"):
            lines.append(check(f"{rate}: {v.replace('-', '+')} time / raw+direct time",
                               ratio(saves[rate], f"fastsave-{v}", "fastsave-raw-direct", "median"),
                               1.1, False))
    for v, base in (("auto", "raw"), ("auto-direct", "raw-direct")):
        lines.append(check(f"700MBps: {v.replace('-', '+')} image / {base.replace('-', '+')} image",
                           ratio(t, f"fastsave-{v}", f"fastsave-{base}", "out_bytes"), 1.0, False)
                     .replace("target <= 1.0", "target < 1.0"))
    return lines


def memory_table(memory: list[Row]) -> list[str]:
    by_mode: dict[str, dict[str, Row]] = {}
    for r in memory:
        by_mode.setdefault(r["mode"], {})[str(r["size_mib"])] = r
    out = ["| mode | stream MiB | peak RSS MiB | stream MiB | peak RSS MiB | growth MiB |",
           "|---|---:|---:|---:|---:|---:|"]
    for mode, rows in by_mode.items():
        if len(rows) != 2:
            continue
        small, full = sorted(rows.values(), key=lambda r: r["stream_bytes"])
        a, b = small["peak_rss_kib"] / 1024, full["peak_rss_kib"] / 1024
        out.append(f"| {mode} | {small['stream_bytes'] // MIB} | {a:.1f} "
                   f"| {full['stream_bytes'] // MIB} | {b:.1f} | {b - a:+.1f} |")
    return out


def render(saves: dict[str, dict[str, Row]], memory: list[Row]) -> str:
    any_row = next((r for rows in saves.values() for r in rows.values()), None)
    size = any_row["stream_bytes"] // MIB if any_row else 0
    rounds = any_row["rounds"] if any_row else 0
    lines = ["# fastsave save benchmarks", "",
             f"Stream: {size} MiB of mixed guest-like data, piped by a producer process; "
             f"median of {rounds} rounds; every contender makes its output durable. "
             "MB/s is stream bytes (10^6) per second of median time; times in seconds.", "",
             "producer s: the producer's own writing time (at 700 MB/s, 1 GiB takes 1.53 s "
             "if it is never held up); tail s: median time from its last write to the "
             "consumer's exit; producer_blocked / output_wait / worker_cpu: fastsave's Stats; "
             "other CPU s: CPU the machine spent beyond producer and consumer during the "
             "round (other work, kernel threads): large values mean a noisy round.", ""]
    for rate in RATES:
        if saves.get(rate):
            lines += [f"## {rate}", "", *rate_table(saves[rate]), ""]
    lines += ["## Ratios", "", *ratios(saves), "", "## Targets", "", "```",
              *targets(saves), "```", ""]
    if memory:
        lines += ["## Peak RSS of the fastsave consumer (unthrottled, buffered)", "",
                  *memory_table(memory), ""]
    return "\n".join(lines)


def main() -> None:
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS / "engine.json"
    dst = Path(sys.argv[2]) if len(sys.argv) > 2 else src.with_suffix(".md")
    text = render(*load(src))
    dst.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
