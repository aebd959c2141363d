"""The main side of a run: one agent process per embedded root, the guests
one after the other, the contenders alternating within every round, a failed
round kept and tried once more."""
from __future__ import annotations

import datetime
import json
import os
import platform
import select
import subprocess
import sys
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any

import libvirt

from ..reaper import orphan_reap_delay, wrap as under_reaper
from . import GIB, REPO, WORK
from .contenders import BY_KEY, SAVER_KINDS, SKIP, Contender, available
from .guests import FULL_GUESTS, GUESTS, QUICK_GUESTS, Guest, guest_xml, without_fill, write_fills
from .machine import disk_speed, fs_type, memory_copy_speed, os_name
from .stats import helper_rss_kib

OP_TIMEOUT = 900.0


class AgentError(Exception):
    pass


class AgentProc:
    def __init__(self, key: str, fmt: str | None) -> None:
        self.key, self.fmt = key, fmt
        self.root = WORK / "roots" / key
        self.log = WORK / "logs" / f"agent-{key}.log"
        self._start()

    def _start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        # run from the repository root (cwd below), where the package is importable
        argv = [sys.executable, "-m", "benchmarks.scoreboard", "--agent", str(self.root)]
        if self.fmt:
            argv += ["--format", self.fmt]
        with open(self.log, "a") as log:
            # under the reaping shim: a stopped QEMU is reaped at once (reaper.py)
            self.proc = subprocess.Popen(under_reaper(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=log, text=True, bufsize=1, cwd=str(REPO))

    def call(self, op: str, timeout: float = OP_TIMEOUT, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self.restart()
            raise AgentError(f"agent {self.key} had died; restarted") from None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            why = "timed out" if not ready else "died"
            self.restart()
            raise AgentError(f"agent {self.key} {why} during {op}; restarted (log: {self.log})")
        msg = json.loads(line)
        if not msg["ok"]:
            raise AgentError(msg["error"])
        return msg["result"]

    def restart(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._start()

    def close(self) -> None:
        try:
            self.call("quit", timeout=60)
        except (AgentError, OSError, ValueError):
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Runner:
    def __init__(self, quick: bool, rounds: int | None = None,
                 guests: list[str] | None = None, only: list[str] | None = None) -> None:
        self.quick = quick
        self.rounds_override = rounds
        self.guest_keys = guests or (QUICK_GUESTS if quick else FULL_GUESTS)
        self.only = only
        self.contenders, self.skipped, self.fastsave_offers = available(libvirt.getVersion(), only)
        self.t_start = time.monotonic()
        self.load_start = os.getloadavg()
        self.agents: dict[str, AgentProc] = {}
        self.running: set[tuple[str, str]] = set()
        self.rounds: list[dict[str, Any]] = []
        self.captures: dict[str, dict[str, Any]] = {}
        self.defined: set[tuple[str, str]] = set()
        self.kernel = ""
        self.info: dict[str, Any] = {}

    def rounds_for(self, g: Guest) -> int:
        if self.rounds_override:
            return self.rounds_override
        return 1 if self.quick else g.rounds_full

    def say(self, msg: str) -> None:
        el = time.monotonic() - self.t_start
        print(f"[{int(el // 60):02d}:{int(el % 60):02d}] {msg}", flush=True)

    def agent(self, key: str) -> AgentProc:
        if key not in self.agents:
            fmt = None if key == "main" else key
            self.agents[key] = AgentProc(key, fmt)
        return self.agents[key]

    def define(self, akey: str, g: Guest) -> None:
        if (akey, g.name) not in self.defined:
            self.agent(akey).call("define", name=g.name, xml=guest_xml(g, self.kernel),
                                  prime=str(self.prime_path(g)))
            self.defined.add((akey, g.name))

    def prime_path(self, g: Guest) -> Path:
        return WORK / "prime" / f"{g.key}.save"

    def prime(self, g: Guest) -> None:
        """The guest's first boot, fill loaded, saved for every later start."""
        path = self.prime_path(g)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        self.define("main", g)
        self.park_others(None)
        res = self.agent("main").call("prime", name=g.name, xml=guest_xml(g, self.kernel),
                                      path=str(path))
        self.say(f"   first boot of {g.key} with its fill, saved for later starts: "
                 f"{res['prime_s']:.1f} s")

    def park_others(self, keep: tuple[str, str] | None) -> None:
        for akey, name in sorted(self.running):
            if (akey, name) != keep:
                self.agent(akey).call("park", name=name)
                self.running.discard((akey, name))

    def recover(self, akey: str, g: Guest) -> None:
        try:
            self.agent(akey).call("recover", name=g.name)
        except AgentError as e:
            self.say(f"   recovery of {g.key} in {akey} failed: {e}")
        self.running.discard((akey, g.name))

    def run_one(self, g: Guest, c: Contender, rnd: int) -> dict[str, Any]:
        a = self.agent(c.agent)
        self.define(c.agent, g)
        rec: dict[str, Any] = {"guest": g.key, "round": rnd, "contender": c.key,
                               "started": time.time()}
        try:
            if c.kind in SAVER_KINDS:
                self.park_others((c.agent, g.name))
                res = a.call("contender", name=g.name, kind=c.kind, params=c.params)
                self.running.add((c.agent, g.name))
                rec.update(res, ok=bool(res["state_ok"]))
                if not res["state_ok"]:
                    rec["error"] = (f"state did not come back (boot id {res['boot_id_before']:#x} "
                                    f"-> {res['boot_id_after']:#x})")
            elif c.kind == "producer":
                self.park_others((c.agent, g.name))
                res = a.call("producer", name=g.name)
                self.running.discard((c.agent, g.name))
                rec.update(res, ok=True)
            else:
                cap = self.captures.get(g.key)
                if cap is None:
                    self.park_others((c.agent, g.name))
                    path = f"/dev/shm/fastsave-compare-{g.key}.stream"
                    cap = a.call("capture", name=g.name, path=path)
                    cap["path"] = path
                    self.captures[g.key] = cap
                    self.say(f"   captured {g.key}'s stream: {cap['bytes'] / 1e6:.0f} MB "
                             f"in {cap['seconds']:.2f} s")
                self.park_others(None)
                self.running.discard((c.agent, g.name))
                lim = guest_xml(g, self.kernel, name=g.name + "-limit",
                                dom_uuid=str(uuidlib.uuid5(uuidlib.NAMESPACE_URL,
                                                           f"fastsave-compare/{g.name}-limit")))
                res = a.call("consumer", name=g.name, xml=without_fill(lim), path=cap["path"],
                             boot_id=cap["boot_id"])
                rec.update(res, ok=bool(res["state_ok"]))
                if not res["state_ok"]:
                    rec["error"] = "the consumer limit's guest did not come back"
        except AgentError as e:
            rec.update(ok=False, error=str(e))
            self.recover(c.agent, g)
        return rec

    def describe(self, rec: dict[str, Any]) -> str:
        c = BY_KEY[rec["contender"]]
        if not rec.get("ok"):
            return f"{c.label}: FAILED: {rec.get('error')}"
        parts = []
        if "save_s" in rec:
            parts.append(f"save {rec['save_s']:.2f} s")
        if "restore_s" in rec:
            parts.append(f"restore {rec['restore_s']:.2f} s")
        if "image_bytes" in rec:
            parts.append(f"image {rec['image_bytes'] / 1e6:.0f} MB")
        if "stream_bytes" in rec:
            parts.append(f"stream {rec['stream_bytes'] / 1e6:.0f} MB")
        rss = helper_rss_kib(rec)
        if rss:
            parts.append(f"helper RSS {rss / 1024:.1f} MiB")
        if rec.get("image_cached_bytes"):
            parts.append(f"{rec['image_cached_bytes'] / 1e6:.0f} MB of the image still cached")
        if "state_ok" in rec:
            parts.append("state back" if rec["state_ok"] else "STATE LOST")
        return f"{c.label}: " + ", ".join(parts)

    def run(self) -> dict[str, Any]:
        from testkit import guest

        guests = [GUESTS[k] for k in self.guest_keys]
        WORK.mkdir(parents=True, exist_ok=True)
        self.say(f"work directory {WORK}; building the test guest and its fill files")
        self.kernel = guest.build_kernel(WORK / "guest")
        write_fills(guests)
        self.disk = disk_speed(WORK)
        self.say(f"disk with O_DIRECT: write {self.disk['write_mb_s']:.0f} MB/s, "
                 f"read {self.disk['read_mb_s']:.0f} MB/s")
        self.mem_copy = memory_copy_speed()
        self.say(f"memory copy (memcpy, one thread): {self.mem_copy:.0f} MB/s")
        self.reap_delay = orphan_reap_delay()
        self.say(f"this machine's init reaps an orphan after {self.reap_delay:.2f} s; "
                 "the agents reap their QEMUs at once")
        self.info = self.agent("main").call("info")
        self.say(f"libvirt {self.info['libvirt']}, QEMU {self.info['qemu']}: "
                 f"{len(self.contenders)} contenders")
        for key, why in self.skipped.items():
            self.say(f"   not available: {BY_KEY[key].label} ({key}): {why}")
        dch = self.fastsave_offers["default_channels"]
        self.say(f"fastsave's default channel count: {dch if dch else 'chosen per save'}")
        try:
            for g in guests:
                n = self.rounds_for(g)
                self.say(f"== guest {g.key}: {g.label}; {n} round(s) of {len(self.contenders)} contenders")
                self.prime(g)
                for rnd in range(1, n + 1):
                    for c in self.contenders:
                        if self.quick is False and c.key in SKIP.get(g.key, ()):
                            continue
                        for attempt in (1, 2):  # a failed round is kept, and tried once more
                            rec = self.run_one(g, c, rnd)
                            rec["attempt"] = attempt
                            rec["loadavg"] = os.getloadavg()[0]
                            self.rounds.append(rec)
                            self.say(f"   {g.key} r{rnd}/{n} {self.describe(rec)}")
                            if rec.get("ok"):
                                break
                self.park_others(None)
                for akey in list(self.agents):
                    if (akey, g.name) in self.defined:
                        try:
                            self.agent(akey).call("undefine", name=g.name)
                        except AgentError as e:
                            self.say(f"   undefine {g.key} in {akey}: {e}")
                        self.defined.discard((akey, g.name))
                cap = self.captures.pop(g.key, None)
                if cap:
                    Path(cap["path"]).unlink(missing_ok=True)
                self.prime_path(g).unlink(missing_ok=True)
        finally:
            for cap in self.captures.values():
                Path(cap["path"]).unlink(missing_ok=True)
            for a in self.agents.values():
                a.close()
        return {
            "meta": {
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "quick": self.quick, "args": sys.argv[1:], "host": platform.node(), "os": os_name(),
                "kernel": platform.release(),
                "cpus": os.cpu_count(), "mem_gib": round(os.sysconf("SC_PAGE_SIZE")
                                                          * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
                "work_dir": str(WORK), "fs": fs_type(WORK), **self.info,
                "init_reap_delay_s": round(self.reap_delay, 3), "disk": self.disk,
                "mem_copy_mb_s": self.mem_copy, "only": self.only,
                "fastsave_default_channels": self.fastsave_offers["default_channels"],
                "fastsave_channels_missing": self.fastsave_offers["channels_missing"],
                "same_as": self.fastsave_offers["same_as"],
                "duration_s": round(time.monotonic() - self.t_start, 1),
                "load_avg_start": self.load_start, "load_avg_end": os.getloadavg(),
            },
            "guests": {g.key: {"mem_mib": g.mem_mib, "fill_mib": g.fill_mib, "label": g.label,
                               "rounds": self.rounds_for(g)} for g in guests},
            "contenders": {c.key: {"label": c.label, "root": c.agent, "kind": c.kind,
                                   "params": c.params} for c in self.contenders},
            "skipped": self.skipped,
            "rounds": self.rounds,
        }
