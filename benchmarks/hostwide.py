"""Host shutdown and boot: fastsave save-all / restore-all against what
libvirt-guests does (a serial loop of `virsh managedsave --bypass-cache`, then
a serial loop of `virsh start`), on the same guests under the system libvirtd,
alternating rounds. Writes benchmarks/results/hostwide.md and .json.

    .venv/bin/python -m benchmarks.hostwide [--guests 4] [--mem 512] [--rounds 3]

(from the repository root)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import libvirt

from fastsave.hostwide import restore_all, save_all
from testkit import guest
from testkit.fixtures import ensure_qemu_user
from testkit.mixed import write_mixed_file
from testkit.system_daemon import restart_libvirtd

from .reaper import orphan_reap_delay, wrap as under_reaper

HERE = Path(__file__).resolve().parent

URI = "qemu:///system"
WORK = Path("/var/tmp/fastsave-hostwide")


def virsh(*args: str) -> None:
    subprocess.run(["virsh", "-q", "-c", URI, *args], check=True, capture_output=True)


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--guests", type=int, default=4)
    ap.add_argument("--mem", type=int, default=512, help="MiB per guest")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if os.environ.get("FASTSAVE_UNDER_REAPER") != "1":
        # QEMU's zombies must be reaped at once, as a host's init does (see
        # reaper.py); libvirtd restarted below daemonizes under the shim.
        reap_delay = orphan_reap_delay()
        os.environ["FASTSAVE_UNDER_REAPER"] = "1"
        os.environ["FASTSAVE_INIT_REAP_DELAY"] = f"{reap_delay:.3f}"
        argv = [sys.executable, "-m", "benchmarks.hostwide", *sys.argv[1:]]  # same cwd
        os.execv(sys.executable, under_reaper(argv))
    ensure_qemu_user()
    restart_libvirtd()
    WORK.mkdir(parents=True, exist_ok=True)
    kernel = guest.build_kernel(WORK / "guest")
    conn = libvirt.open(URI)
    doms = []
    for i in range(args.guests):
        fill = WORK / f"fill{i}.bin"
        size = (args.mem * 3 // 4) << 20
        if not fill.exists() or fill.stat().st_size != size:
            write_mixed_file(fill, size, seed=100 + i)
        name = f"fs-hostwide-{i}"
        try:
            guest.discard(conn.lookupByName(name))
        except libvirt.libvirtError:
            pass
        doms.append(conn.defineXML(guest.domain_xml(name, kernel, args.mem, fill=str(fill))))
    names = [d.name() for d in doms]
    rows: dict[str, list[float]] = {k: [] for k in ("virsh_save", "virsh_start", "save_all", "restore_all")}
    try:
        for d in doms:
            d.create()
        for d in doms:
            guest.wait_booted(d)
        for rnd in range(args.rounds):
            # libvirt-guests' way: one guest after the other.
            rows["virsh_save"].append(timed(lambda: [virsh("managedsave", "--bypass-cache", n) for n in names]))
            rows["virsh_start"].append(timed(lambda: [virsh("start", "--bypass-cache", n) for n in names]))
            # fastsave: all at once.
            rep = save_all(conn, names=names)
            assert rep.ok, [r.error for r in rep.results]
            rows["save_all"].append(rep.seconds)
            rep = restore_all(conn, names=names)
            assert rep.ok, [r.error for r in rep.results]
            rows["restore_all"].append(rep.seconds)
            print(f"round {rnd + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in rows.items()), flush=True)
    finally:
        for d in doms:
            try:
                guest.discard(d)
            except libvirt.libvirtError:
                pass
    med = {k: statistics.median(v) for k, v in rows.items()}
    save_ratio = med["save_all"] / med["virsh_save"]
    restore_ratio = med["restore_all"] / med["virsh_start"]
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "hostwide.json").write_text(json.dumps({"args": vars(args), "rounds": rows}, indent=1))
    md = [f"# Host-wide save and restore: {args.guests} guests x {args.mem} MiB "
          f"({args.mem * 3 // 4} MiB guest-like data each), median of {args.rounds} rounds", "",
          "| what | median s | vs libvirt-guests' way |", "|---|---:|---:|",
          f"| serial `virsh managedsave --bypass-cache` | {med['virsh_save']:.2f} | 1.00 |",
          f"| `fastsave save-all` | {med['save_all']:.2f} | {save_ratio:.2f} |",
          f"| serial `virsh start --bypass-cache` | {med['virsh_start']:.2f} | 1.00 |",
          f"| `fastsave restore-all` | {med['restore_all']:.2f} | {restore_ratio:.2f} |", "",
          f"{'PASS' if save_ratio <= 0.5 else 'MISS'} save-all <= 0.5x serial managedsave: {save_ratio:.2f}",
          "", "libvirtd and its QEMUs ran under `benchmarks/reaper.py`, which reaps a stopped "
          "QEMU at once as a host's init does (this machine's pid 1 took "
          f"{os.environ.get('FASTSAVE_INIT_REAP_DELAY', '?')} s, which every serial stop would "
          "otherwise pay once and a parallel save-all once for all)."]
    (out / "hostwide.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
