"""Benchmark consumer: saves the stream on stdin with fastsave.

usage: fastsave_consumer.py IMAGE MODE [direct]

Prints "ready" once imported (so start-up is not timed), then the save's
Stats as one JSON line, with this process's peak RSS (VmHWM) added.
"""
from __future__ import annotations

import dataclasses
import json
import sys

from fastsave import engine


def vmhwm_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def main() -> None:
    path, mode = sys.argv[1], sys.argv[2]
    direct = sys.argv[3:] == ["direct"]
    print("ready", flush=True)
    stats = engine.save_stream(0, path, mode=mode, direct=direct)  # type: ignore[arg-type]
    print(json.dumps({**dataclasses.asdict(stats), "vmhwm_kib": vmhwm_kib()}), flush=True)


if __name__ == "__main__":
    main()
