"""Save benchmarks: fastsave against cat, dd and zstd, each fed by a producer process.

No assertions on speed: `report.py` turns the JSON into tables and target checks.
"""
from __future__ import annotations

from typing import Any, Callable

import pytest

MIB = 1 << 20
RATES = {"unthrottled": 0.0, "700MBps": 700e6}
CONTENDERS = [
    "cat", "dd", "dd-direct", "zstd-T2", "zstd-T1",
    "fastsave-raw", "fastsave-raw-direct",
    "fastsave-zstd", "fastsave-zstd-direct",
    "fastsave-auto", "fastsave-auto-direct",
]


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("rate", list(RATES))
def test_save(benchmark: Any, save_bench: Callable[..., dict[str, Any]], rate: str,
              contender: str) -> None:
    benchmark.group = f"save {rate}"
    save_bench(benchmark, contender, RATES[rate])


@pytest.mark.parametrize("size_mib", [256, "full"])
@pytest.mark.parametrize("mode", ["raw", "zstd", "auto"])
def test_memory_scaling(benchmark: Any, save_bench: Callable[..., dict[str, Any]],
                        stream_size: int, mode: str, size_mib: int | str) -> None:
    """Peak RSS of the fastsave consumer should not grow with the stream."""
    full = stream_size
    size = full if size_mib == "full" else min(int(size_mib) * MIB, full // 4)
    benchmark.group = "memory"
    benchmark.extra_info["size_mib"] = size // MIB
    save_bench(benchmark, f"fastsave-{mode}", 0.0, size=size, rounds=1)
