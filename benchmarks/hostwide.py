"""Host shutdown and boot: saving and restoring every guest of a host, under
the system libvirtd, each way in turn within every round:

- serial: what libvirt-guests does, a loop of `virsh managedsave
  --bypass-cache NAME`, then a loop of `virsh start --bypass-cache NAME`;
- parallel: the same virsh commands, all guests at once;
- parallel-save (libvirt >= 11.2): libvirt's parallel save, all guests at
  once: `virsh save NAME FILE --image-format sparse --parallel-channels 2`
  (page cache, then an fdatasync of each file), restored with `virsh restore
  FILE --parallel-channels 2 --bypass-cache`;
- fastsave: `fastsave.hostwide.save_all` / `restore_all` (its defaults).

The guests have similar content, as guests booted from one OS image do: the
same guest-like fill (testkit/mixed.py, one seed) in all of them, and a small
part of their own (a different seed each). A save counts until its images are
durable (fastsave syncs before it returns; after libvirt's, each image is
fdatasync'ed, timed); bytes written = the images' allocated size
(st_blocks * 512). Before each restore the images are dropped from the page
cache, as at a boot. Writes OUT/NAME.md and .json (default
benchmarks/results/hostwide).

    .venv/bin/python -m benchmarks.hostwide [--guests 6] [--mem 1024] [--rounds 3]
        [--ways serial,parallel,parallel-save,fastsave] [--out-dir DIR] [--out-name NAME]

(from the repository root, as root; it restarts the system libvirtd)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import libvirt

import fastsave
from fastsave.hostwide import restore_all, save_all
from testkit import guest
from testkit.fixtures import ensure_qemu_user
from testkit.mixed import write_mixed_file
from testkit.system_daemon import restart_libvirtd

from .reaper import orphan_reap_delay, wrap as under_reaper
from .scoreboard.guests import without_fill
from .scoreboard.machine import os_name, uncache, warm_memory

HERE = Path(__file__).resolve().parent
URI = "qemu:///system"
WORK = Path("/var/tmp/fastsave-hostwide")
MANAGED_DIR = Path("/var/lib/libvirt/qemu/save")  # the system libvirtd's managed images
LIBVIRT_PARALLEL = 11_002_000  # virsh save --parallel-channels / --image-format sparse
PARALLEL_CHANNELS = 2
SHARED_SEED = 1
WAYS = ("serial", "parallel", "parallel-save", "fastsave")
LABELS = {
    "serial": "libvirt-guests' way: serial `virsh managedsave --bypass-cache` / `virsh start --bypass-cache`",
    "parallel": "all at once: `virsh managedsave --bypass-cache` / `virsh start --bypass-cache`",
    "parallel-save": f"all at once: `virsh save --image-format sparse --parallel-channels "
                     f"{PARALLEL_CHANNELS}` / `virsh restore --parallel-channels {PARALLEL_CHANNELS} "
                     "--bypass-cache`",
    "fastsave": "`fastsave save-all` / `fastsave restore-all` (save_all / restore_all)",
}


SHORT = {"serial": "serial virsh managedsave", "parallel": "parallel virsh managedsave",
         "parallel-save": f"parallel virsh save --parallel-channels {PARALLEL_CHANNELS}"}


def virsh(*args: str) -> list[str]:
    return ["virsh", "-q", "-c", URI, *args]


def run_all(cmds: list[list[str]], parallel: bool) -> None:
    """Runs the commands one after the other or all at once; raises with the
    first failure's stderr."""
    if not parallel:
        for c in cmds:
            r = subprocess.run(c, capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(f"{' '.join(c)}: {r.stderr.strip()}")
        return
    procs = [(c, subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
             for c in cmds]
    errors = []
    for c, p in procs:
        _, err = p.communicate()
        if p.returncode:
            errors.append(f"{' '.join(c)}: {err.strip()}")
    if errors:
        raise RuntimeError("; ".join(errors))


def fdatasync_all(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)


class Host:
    def __init__(self, conn: libvirt.virConnect, names: list[str]) -> None:
        self.conn, self.names = conn, names
        self.store = fastsave.image_store(conn)
        self.boot_ids: dict[str, int] = {}

    def dom(self, name: str) -> libvirt.virDomain:
        return self.conn.lookupByName(name)

    def images(self, way: str) -> list[Path]:
        if way == "fastsave":
            return [Path(self.store.image_path(self.dom(n).UUIDString())) for n in self.names]
        if way == "parallel-save":
            return [WORK / "saves" / f"{n}.save" for n in self.names]
        return [MANAGED_DIR / f"{n}.save" for n in self.names]

    def save(self, way: str) -> None:
        if way == "fastsave":
            rep = save_all(self.conn, names=self.names)
            if not rep.ok:
                raise RuntimeError("; ".join(f"{r.name}: {r.error}" for r in rep.results if not r.ok))
        elif way == "parallel-save":
            (WORK / "saves").mkdir(parents=True, exist_ok=True)
            run_all([virsh("save", n, str(p), "--image-format", "sparse", "--parallel-channels",
                           str(PARALLEL_CHANNELS)) for n, p in zip(self.names, self.images(way))],
                    parallel=True)
        else:
            run_all([virsh("managedsave", "--bypass-cache", n) for n in self.names],
                    parallel=way == "parallel")

    def restore(self, way: str) -> None:
        if way == "fastsave":
            rep = restore_all(self.conn, names=self.names)
            if not rep.ok:
                raise RuntimeError("; ".join(f"{r.name}: {r.error}" for r in rep.results if not r.ok))
        elif way == "parallel-save":
            run_all([virsh("restore", str(p), "--parallel-channels", str(PARALLEL_CHANNELS),
                           "--bypass-cache") for p in self.images(way)], parallel=True)
            for p in self.images(way):
                p.unlink(missing_ok=True)  # a plain save file stays after a restore
        else:
            run_all([virsh("start", "--bypass-cache", n) for n in self.names],
                    parallel=way == "parallel")

    def check(self) -> None:
        for n in self.names:
            bid = guest.read_state(self.dom(n)).boot_id
            if bid != self.boot_ids[n]:
                raise RuntimeError(f"{n}: state did not come back (boot id {self.boot_ids[n]:#x} "
                                   f"-> {bid:#x})")

    def recover(self, way: str) -> None:
        """After a failure: every guest running again from its first boot's
        state is not possible, so from whatever image is left, else booted
        anew (its boot id then changes, and is taken as the new one)."""
        for n in self.names:
            d = self.dom(n)
            try:
                if not d.isActive():
                    fastsave.start(d) if fastsave.has_managed_save_image(d) else d.create()
            except libvirt.libvirtError:
                fastsave.managed_save_remove(d)
                d.create()
        for p in self.images("parallel-save"):
            p.unlink(missing_ok=True)
        for n in self.names:
            self.boot_ids[n] = guest.wait_booted(self.dom(n), timeout=180).boot_id

    def round(self, way: str, warm_kib: int) -> dict[str, Any]:
        rec: dict[str, Any] = {"way": way}
        try:
            t0 = time.perf_counter()
            self.save(way)
            t1 = time.perf_counter()
            paths = self.images(way)
            if way != "fastsave":  # fastsave syncs before it returns
                fdatasync_all(paths)
            t2 = time.perf_counter()
            sts = [p.stat() for p in paths]
            rec.update(save_s=t2 - t0, save_returned_s=t1 - t0,
                       bytes_written=sum(st.st_blocks * 512 for st in sts),
                       bytes_apparent=sum(st.st_size for st in sts))
            os.sync()
            for p in paths:
                uncache(p)
            rec["warm_s"] = warm_memory(warm_kib)
            t0 = time.perf_counter()
            self.restore(way)
            rec["restore_s"] = time.perf_counter() - t0
            self.check()
            rec["ok"] = True
        except Exception as e:  # noqa: BLE001 - recorded, the guests recovered, the run goes on
            rec.update(ok=False, error=f"{type(e).__name__}: {e}")
            self.recover(way)
        return rec


def make_guests(conn: libvirt.virConnect, kernel: str, count: int, mem: int) -> list[str]:
    """Defines and boots `count` guests of `mem` MiB with the shared fill and
    a part of their own, then takes the fill's loader devices out of their
    definitions and live XML (a save and restore of each), so no later start
    re-reads the fill files."""
    shared_mib, own_mib = mem * 3 // 4, max(1, mem // 64)
    shared = WORK / f"fill-shared-seed{SHARED_SEED}-{shared_mib}MiB.bin"
    if not shared.exists() or shared.stat().st_size != shared_mib << 20:
        write_mixed_file(shared, shared_mib << 20, seed=SHARED_SEED)
    names = []
    for i in range(count):
        own = WORK / f"fill-own{i}-{own_mib}MiB.bin"
        if not own.exists() or own.stat().st_size != own_mib << 20:
            write_mixed_file(own, own_mib << 20, seed=100 + i)
        name = f"fs-hostwide-{i}"
        try:
            old = conn.lookupByName(name)
            fastsave.managed_save_remove(old)
            guest.discard(old)
        except libvirt.libvirtError:
            pass
        xml = guest.domain_xml(name, kernel, mem, fill=str(shared))
        own_addr = (16 + shared_mib) << 20
        xml = xml.replace("</qemu:commandline>",
                          f"<qemu:arg value='-device'/><qemu:arg value='loader,file={own},"
                          f"addr=0x{own_addr:x},force-raw=on'/></qemu:commandline>")
        conn.defineXML(xml)
        names.append(name)
    for n in names:
        conn.lookupByName(n).create()
    for n in names:
        d = conn.lookupByName(n)
        guest.wait_booted(d, timeout=180)
        prime = WORK / f"{n}.prime"
        d.save(str(prime))
        plain = without_fill(d.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE))
        conn.defineXML(plain)
        conn.restoreFlags(str(prime), plain, libvirt.VIR_DOMAIN_SAVE_RUNNING)
        prime.unlink()
    return names


def summarize(rows: list[dict[str, Any]], ways: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for w in ways:
        good = [r for r in rows if r["way"] == w and r.get("ok")]
        s: dict[str, Any] = {"rounds": sum(r["way"] == w for r in rows), "ok": len(good)}
        for k in ("save_s", "save_returned_s", "restore_s", "bytes_written", "bytes_apparent"):
            vals = [r[k] for r in good if r.get(k) is not None]
            s[k] = statistics.median(vals) if vals else None
        out[w] = s
    return out


def report(meta: dict[str, Any], summ: dict[str, dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    def f(v: float | None, spec: str = ".2f") -> str:
        return "-" if v is None else format(v, spec)

    def rel(a: float | None, b: float | None) -> str:
        return "-" if a is None or not b else f"{a / b:.2f}"

    a = meta["args"]
    ser = summ.get("serial", {})
    md = [f"# Host-wide save and restore: {a['guests']} guests x {a['mem']} MiB, median of "
          f"{a['rounds']} round(s)", "",
          f"{meta['date']}, {meta['os']}, libvirt {meta['libvirt']}, QEMU {meta['qemu']}, "
          f"{meta['cpus']} CPUs; images on /var/lib/libvirt/qemu/save (libvirt's managed), "
          f"{WORK}/saves (libvirt's plain saves) and fastsave's store. Regenerate: "
          f"`.venv/bin/python -m benchmarks.hostwide {' '.join(meta['argv'])}`.", "",
          f"Each guest holds {a['mem'] * 3 // 4} MiB of the same guest-like data (one seed for all, as "
          f"guests booted from one OS image share most of their content) and {max(1, a['mem'] // 64)} "
          "MiB of its own. Ways alternate within every round. save = until every image is durable "
          "(fastsave syncs before it returns; after libvirt's, each image is fdatasync'ed, timed: "
          "\"returned\" is when the commands themselves were done); bytes written = the images' "
          "allocated size (st_blocks x 512; a sparse file's length is larger). Before each restore "
          "the images are dropped from the page cache, as at a boot, and guest RAM is warmed "
          "(this VM hands freed memory back to its host). After every restore each guest's boot "
          "id must be the one it had.", "",
          "| way | save s | returned s | x serial | bytes written MB | (length MB) | restore s "
          "| x serial | ok/rounds |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for w, s in summ.items():
        md.append(f"| {LABELS[w]} | {f(s['save_s'])} | {f(s['save_returned_s'])} "
                  f"| {rel(s['save_s'], ser.get('save_s'))} "
                  f"| {f(s['bytes_written'] / 1e6 if s['bytes_written'] else None, '.0f')} "
                  f"| {f(s['bytes_apparent'] / 1e6 if s['bytes_apparent'] else None, '.0f')} "
                  f"| {f(s['restore_s'])} | {rel(s['restore_s'], ser.get('restore_s'))} "
                  f"| {s['ok']}/{s['rounds']} |")
    md.append("")
    left = meta.get("not_available") or {}
    if left:
        md += ["Not available on this stack: " + "; ".join(f"{w} ({why})" for w, why in left.items())
               + ".", ""]
    fs = summ.get("fastsave", {})
    for w in ("serial", "parallel", "parallel-save"):
        if w in summ and fs.get("save_s") and summ[w].get("save_s"):
            r = fs["save_s"] / summ[w]["save_s"]
            limit = 0.5 if w == "serial" else 1.0
            md.append(f"{'PASS' if r <= limit else 'MISS'} fastsave save-all / {SHORT[w]}: {r:.2f} "
                      f"(target <= {limit:g}, margin {1 - r / limit:+.1%})")
    md += ["", "Failures: " + ("; ".join(f"{r['way']}: {r['error']}" for r in rows if not r.get("ok"))
                              or "none"), "",
           "libvirtd and its QEMUs ran under `benchmarks/reaper.py`, which reaps a stopped QEMU "
           "at once as a host's init does (this machine's pid 1 took "
           f"{meta.get('init_reap_delay_s', '?')} s, which every serial stop would otherwise pay "
           "once and a parallel one once for all)."]
    return "\n".join(md) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.hostwide",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--guests", type=int, default=6)
    ap.add_argument("--mem", type=int, default=1024, help="MiB per guest")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ways", default=",".join(WAYS),
                    help=f"comma-separated, of {', '.join(WAYS)} (default: all this libvirt offers)")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    ap.add_argument("--out-name", default="hostwide")
    args = ap.parse_args()
    ways = args.ways.split(",")
    if any(w not in WAYS for w in ways):
        ap.error(f"--ways: known ways are {', '.join(WAYS)}")
    if os.geteuid() != 0:
        print("hostwide restarts and drives the system libvirtd: run it as root", file=sys.stderr)
        return 2
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
    # errors are raised as exceptions and reported; libvirt's default handler
    # would also print every expected one (a lookup of a name not yet defined)
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open(URI)
    ver = conn.getLibVersion()
    not_available = {}
    if "parallel-save" in ways and ver < LIBVIRT_PARALLEL:
        ways.remove("parallel-save")
        not_available["parallel-save"] = (f"needs libvirt >= 11.2 (virsh save --parallel-channels); "
                                          f"this is libvirt {ver // 1000000}.{ver // 1000 % 1000}")
    t_start = time.monotonic()
    names = make_guests(conn, kernel, args.guests, args.mem)
    host = Host(conn, names)
    rows: list[dict[str, Any]] = []
    try:
        for n in names:
            host.boot_ids[n] = guest.read_state(host.dom(n)).boot_id
        warm_kib = args.guests * args.mem * 1024 + (512 << 10)
        for rnd in range(1, args.rounds + 1):
            for w in ways:
                rec = host.round(w, warm_kib)
                rec["round"] = rnd
                rows.append(rec)
                what = (f"save {rec['save_s']:.2f} s (returned {rec['save_returned_s']:.2f}), "
                        f"{rec['bytes_written'] / 1e6:.0f} MB written, restore {rec['restore_s']:.2f} s"
                        if rec.get("ok") else f"FAILED: {rec['error']}")
                print(f"round {rnd} {w}: {what}", flush=True)
    finally:
        for n in names:
            try:
                d = conn.lookupByName(n)
                fastsave.managed_save_remove(d)
                guest.discard(d)
            except libvirt.libvirtError:
                pass
    summ = summarize(rows, ways)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "os": os_name(), "libvirt": f"{ver // 1000000}.{ver // 1000 % 1000}.{ver % 1000}",
            "qemu": (lambda v: f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}")(conn.getVersion()),
            "cpus": os.cpu_count(), "args": vars(args) | {"out_dir": str(args.out_dir)},
            "argv": sys.argv[1:], "ways": ways, "not_available": not_available,
            "init_reap_delay_s": os.environ.get("FASTSAVE_INIT_REAP_DELAY"),
            "duration_s": round(time.monotonic() - t_start, 1)}
    md = report(meta, summ, rows)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.out_name}.json").write_text(
        json.dumps({"meta": meta, "summary": summ, "rounds": rows}, indent=1) + "\n")
    (args.out_dir / f"{args.out_name}.md").write_text(md)
    print(md)
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
