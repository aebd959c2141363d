"""The scoreboard: libvirt's managed save next to fastsave's, on real QEMU guests.

usage (from the repository root):
    .venv/bin/python -m benchmarks.scoreboard [--quick] [--rounds N] [--guests KEYS]
                                              [--only CONTENDERS] [--list]
                                              [--out-name STEM] [--out-dir DIR]
                                              [--[no-]readme] [--report-only JSON]

Every contender saves and restores the same test guest (tests/guest, its RAM
filled with deterministic guest-like data), in rounds that alternate the
contenders (A B C ... A B C ...). Contenders:

- libvirt `managedSave(0)` (raw image), `managedSave(VIR_DOMAIN_SAVE_BYPASS_CACHE)`,
  and libvirt with `save_image_format = "lzop"` / `"gzip"` (each in a private
  embedded root of its own, with its own domain defined from the same XML);
  restore is libvirt's start of the domain;
- on libvirt >= 10.4, libvirt with `save_image_format = "zstd"` (its own root
  too); on libvirt >= 11.2, libvirt's parallel save with 2 and 4 channels, with
  and without VIR_DOMAIN_SAVE_BYPASS_CACHE: `dom.saveParams()` to a plain file
  (image_format "sparse", parallel.channels; there is no managed parallel save)
  and `conn.restoreParams()` with the same channels and flags. Contenders the
  installed libvirt (`libvirt.getVersion()`) does not offer are left out of the
  run with the reason printed and recorded;
- fastsave `managed_save(dom, mode=M, direct=D)` for M in raw, zstd, auto and
  D in True, False; restore is `fastsave.start(dom)`; fastsave's default
  (`mode="auto"`) and zstd with its default I/O, each also with
  `channels=1, 2, 4` (QEMU's multifd; the count that is fastsave's default
  is the default row itself, run once). Where fastsave has no `channels`
  option the multi-channel rows are listed as not available, with why;
- two limits: QEMU migrating into a pipe drained to /dev/null (producer) and
  QEMU taking an incoming migration from a stream held in memory (consumer).

A save is timed until its image is durable: fastsave syncs before returning;
after each libvirt call an fdatasync of the image is timed as well, and the
time the call itself returned is kept next to it (`save_returned_s`).
After each restore the guest's boot id must be the one it had before the save.
Outputs: benchmarks/results/STEM.{md,json,png}, STEM being compare (a --quick
run: compare-quick) or --out-name, and a block of the "Benchmark results"
section of README.md, one block per STEM (full runs and --out-name runs, or
as --readme / --no-readme say).

One embedded libvirt root serves one process, so each root is driven by an
agent process (`python -m benchmarks.scoreboard --agent ROOT`) that the main
process talks to with JSON lines; only one guest runs at any time. fastsave's
phases come from its trace hook (`fastsave.trace`). Environment:
FASTSAVE_COMPARE_DIR (work directory, default /var/tmp/fastsave-compare; holds
the roots, the guest kernel and the fill files, which are kept for the next run).

Modules, one job each: contenders (what is compared), guests (the test guests,
their fill and XML), machine (/proc probes, disk speed), agent (one embedded
root: running guests, timing one contender), runner (the agents, alternating
rounds), stats (medians, phases, ratios, targets), markdown (tables, PASS/MISS,
the report), plot (the chart), readme (the README's results blocks), __main__
(the command line).

Targets (stats.targets, per stack, on the 1.5 GiB guest or the largest guest
with data that ran): fastsave's default save <= 0.7x libvirt's fastest save
of any format or channel count, its image <= 0.85x libvirt's raw one;
fastsave zstd's save <= 0.5x libvirt zstd's (else libvirt's fastest
compressed format, said so) with an image no larger; fastsave's default
restore <= 0.7x libvirt's fastest restore of its own image; the engine's
peak RSS flat in guest size. A MISS carries a line on where the time went
(the phases). stats.channel_scaling: stream throughput per channel for 1, 2,
4 channels, and a projection for 16 and 64 cores (marked as such).
"""
from __future__ import annotations

import os
from pathlib import Path

MIB = 1 << 20
GIB = 1 << 30
REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
README = REPO / "README.md"
WORK = Path(os.environ.get("FASTSAVE_COMPARE_DIR", "/var/tmp/fastsave-compare"))
