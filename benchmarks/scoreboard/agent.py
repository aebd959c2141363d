"""One embedded libvirt root, driven in a process of its own: defines,
starts, saves and restores its guests, and times one contender at a time.
Talks JSON lines with the runner (`agent_main`)."""
from __future__ import annotations

import dataclasses
import fcntl
import importlib.metadata
import json
import mmap
import os
import re
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from .contenders import SAVE_PARAM_FILE, SAVE_PARAM_IMAGE_FORMAT, SAVE_PARAM_PARALLEL_CHANNELS
from .guests import with_incoming, without_fill
from .machine import Watch, busy_share, cpu_busy, reset_hwm, status_kib, uncache, warm_memory

LIMIT_POLL = 0.005     # the limits poll QEMU faster: they are meant to be a bound
SETTLE = 0.3           # let a guest run a moment between a start and the next save
PIPE_SIZE = 1 << 20
WARM_EXTRA_KIB = 512 << 10  # beyond guest RAM: QEMU's own, the engine's buffers
UNLIMITED_BANDWIDTH = 1 << 40


def migration_end(dom: Any) -> dict[str, Any]:
    """Polls QEMU every LIMIT_POLL s until its migration (either way) is over;
    returns the last query-migrate."""
    from fastsave.virt import qmp

    while True:
        info: dict[str, Any] = qmp(dom, "query-migrate") or {}
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        time.sleep(LIMIT_POLL)


class Agent:
    """Drives one embedded root: defines, starts, saves and restores its domains."""

    def __init__(self, root: str, fmt: str | None) -> None:
        import fastsave
        import fastsave.connect
        import fastsave.engine
        import fastsave.trace
        import libvirt

        self.libvirt, self.fastsave = libvirt, fastsave
        self.root = Path(root)
        conf = fastsave.connect.EMBED_QEMU_CONF + (f'save_image_format = "{fmt}"\n' if fmt else "")
        self.conn = fastsave.open_connection(fastsave.prepare_embed_root(root, qemu_conf=conf))
        self.primes: dict[str, tuple[str, str]] = {}
        # fastsave's phase boundaries, from its trace hook: (perf_counter time, event, None)
        self.events: list[tuple[float, str, Any]] = []
        self.engine_stats: dict[str, dict[str, Any]] = {}  # "save"/"restore": engine Stats
        # the hook stamps time.monotonic(); the agent times with perf_counter
        # (both CLOCK_MONOTONIC on Linux, so this offset is ~0)
        self.clock_offset = time.perf_counter() - time.monotonic()
        fastsave.trace.add(self._on_trace)

    def _on_trace(self, event: str, domain: str, when: float, details: dict[str, Any]) -> None:
        """Keeps fastsave's phase boundaries for the time breakdown, and the
        engine's Stats that come with the end of a save and of a restore."""
        self.events.append((when + self.clock_offset, event, None))
        stats = details.get("stats")
        if stats is not None:
            self.engine_stats[event.split(".", 1)[0]] = dataclasses.asdict(stats)

    # helpers
    def dom(self, name: str) -> Any:
        return self.conn.lookupByName(name)

    def qemu_pid(self, name: str) -> int | None:
        try:
            return int((self.root / "run" / "qemu" / f"{name}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def libvirt_image(self, name: str) -> Path:
        return self.root / "lib" / "qemu" / "save" / f"{name}.save"

    def params_image(self, name: str) -> Path:
        """Where the virDomainSaveParams contenders save (a plain save file)."""
        return self.root / "params-save" / f"{name}.save"

    def fastsave_image(self, dom: Any) -> Path:
        return Path(self.fastsave.image_store(self.conn).image_path(dom.UUIDString()))

    def _remove_images(self, dom: Any) -> None:
        self.fastsave.managed_save_remove(dom)
        if dom.hasManagedSaveImage(0):
            dom.managedSaveRemove(0)

    def _lookup(self, name: str) -> Any:
        try:
            return self.conn.lookupByName(name)
        except self.libvirt.libvirtError:
            return None

    def _events(self, t0: float) -> list[tuple[float, str, Any]]:
        return [(t - t0, what, detail) for t, what, detail in self.events if t >= t0]

    # ops
    def op_info(self) -> dict[str, Any]:
        def ver(v: int) -> str:
            return f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}"

        return {"libvirt": ver(self.conn.getLibVersion()), "qemu": ver(self.conn.getVersion()),
                "fastsave": importlib.metadata.version("fastsave")}

    def op_define(self, name: str, xml: str, prime: str) -> dict[str, Any]:
        from testkit import guest

        for n in (name, name + "-limit"):
            old = self._lookup(n)
            if old is not None:
                guest.discard(old)
        self.conn.defineXML(without_fill(xml))
        self.primes[name] = (prime, without_fill(xml))
        return {}

    def op_prime(self, name: str, xml: str, path: str) -> dict[str, Any]:
        """Boots the guest once with its fill loaded and saves it with
        libvirt's plain save (raw: this agent's root has no image format
        set) to `path`: every later start of the guest, in any root, is a
        restore of that file with the fill-free XML."""
        from testkit import guest

        t = time.perf_counter()
        live = self.conn.createXML(xml, 0)
        guest.wait_booted(live, timeout=180)
        live.save(path)
        return {"prime_s": time.perf_counter() - t}

    def op_undefine(self, name: str) -> dict[str, Any]:
        self.op_recover(name)
        dom = self._lookup(name)
        if dom is not None:
            dom.undefine()
        return {}

    def op_recover(self, name: str) -> dict[str, Any]:
        """After a failure: nothing running, no images; the next use boots fresh."""
        lim = self._lookup(name + "-limit")
        if lim is not None and lim.isActive():
            lim.destroy()
        dom = self._lookup(name)
        if dom is not None:
            if dom.isActive():
                dom.destroy()
            self._remove_images(dom)
        self.params_image(name).unlink(missing_ok=True)
        return {}

    def op_ensure_running(self, name: str) -> dict[str, Any]:
        from testkit import guest

        dom = self.dom(name)
        if dom.isActive():
            if dom.state()[0] == self.libvirt.VIR_DOMAIN_PAUSED:
                dom.resume()
            return {"boot_s": 0.0}
        self._remove_images(dom)
        t = time.perf_counter()
        prime, xml = self.primes[name]
        self.conn.restoreFlags(prime, xml, self.libvirt.VIR_DOMAIN_SAVE_RUNNING)
        guest.wait_booted(self.dom(name), timeout=180)
        return {"boot_s": time.perf_counter() - t}

    def op_park(self, name: str) -> dict[str, Any]:
        dom = self._lookup(name)
        if dom is None or not dom.isActive():
            return {"destroy_s": 0.0}
        t = time.perf_counter()
        dom.destroy()
        return {"destroy_s": time.perf_counter() - t}

    def op_contender(self, name: str, kind: str, params: dict[str, Any]) -> dict[str, Any]:
        from testkit import guest

        dom = self.dom(name)
        res: dict[str, Any] = {"boot_s": self.op_ensure_running(name)["boot_s"]}
        time.sleep(SETTLE)
        before = guest.read_state(dom)
        os.sync()
        qpid = self.qemu_pid(name)

        # save
        self.events.clear()
        self.engine_stats.clear()
        watch = Watch(qpid)
        reset_hwm()
        rss0 = status_kib("self", "VmRSS") or 0
        watch.start()
        cpu0 = cpu_busy()
        t0 = time.perf_counter()
        path = (self.libvirt_image(name) if kind == "libvirt" else
                self.params_image(name) if kind == "libvirt-params" else None)
        try:
            if kind == "libvirt":
                dom.managedSave(params["flags"])
            elif kind == "libvirt-params":
                path.parent.mkdir(parents=True, exist_ok=True)
                path.unlink(missing_ok=True)
                dom.saveParams({SAVE_PARAM_FILE: str(path), SAVE_PARAM_IMAGE_FORMAT: "sparse",
                                SAVE_PARAM_PARALLEL_CHANNELS: params["channels"]}, params["flags"])
            else:
                self.fastsave.managed_save(dom, **params)
        finally:
            t1 = time.perf_counter()
            watch.stop()
        t2 = t1
        if path is not None:
            # libvirt's call may return before the image is on disk (its
            # iohelper fdatasyncs; a sparse save is written by QEMU itself):
            # the save counts until an fdatasync of the image has returned.
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
            t2 = time.perf_counter()
        res["save_s"] = t2 - t0
        res["save_returned_s"] = t1 - t0
        res["save_sync_s"] = t2 - t1
        res["busy_save"] = busy_share(cpu0, cpu_busy())
        res["inproc_hwm_growth_kib"] = max(0, (status_kib("self", "VmHWM") or 0) - rss0)
        res["save_watch"] = watch.summary(t0)
        res["save_events"] = self._events(t0)
        if kind == "fastsave" and "save" in self.engine_stats:
            res["save_stats"] = self.engine_stats["save"]
        if path is None:
            path = self.fastsave_image(dom)
            res.update(self._image_streams(path))
        st = path.stat()
        res["image_bytes"] = st.st_size
        res["image_alloc_bytes"] = st.st_blocks * 512
        if kind == "libvirt-params":  # sparse: what it takes on disk, not its length
            res["image_bytes"], res["image_apparent_bytes"] = st.st_blocks * 512, st.st_size
        os.sync()
        res["image_cached_bytes"] = uncache(path)

        # restore
        res["warm_s"] = warm_memory(dom.maxMemory() + WARM_EXTRA_KIB)
        self.events.clear()
        self.engine_stats.clear()
        watch = Watch(None)
        watch.start()
        cpu0 = cpu_busy()
        t0 = time.perf_counter()
        try:
            if kind == "libvirt":
                dom.createWithFlags(params["start_flags"])
            elif kind == "libvirt-params":
                self.conn.restoreParams({SAVE_PARAM_FILE: str(path),
                                         SAVE_PARAM_PARALLEL_CHANNELS: params["channels"]},
                                        params["flags"])
            else:
                # a restore follows the image (its mode and channels)
                self.fastsave.start(dom, **{k: v for k, v in params.items()
                                            if k not in ("mode", "channels")})
        finally:
            t1 = time.perf_counter()
            watch.stop()
        res["restore_s"] = t1 - t0
        res["busy_restore"] = busy_share(cpu0, cpu_busy())
        res["restore_watch"] = watch.summary(t0)
        res["restore_events"] = self._events(t0)
        if kind == "fastsave" and "restore" in self.engine_stats:
            res["restore_stats"] = self.engine_stats["restore"]
        after = guest.read_state(dom)
        res["boot_id_before"], res["boot_id_after"] = before.boot_id, after.boot_id
        res["counter_before"], res["counter_after"] = before.counter, after.counter
        res["state_ok"] = after.boot_id == before.boot_id and dom.isActive()
        res["image_gone"] = not path.exists()
        if kind == "libvirt-params":  # a plain save file stays; libvirt's managed one is removed
            path.unlink(missing_ok=True)
        return res

    def _image_streams(self, path: Path) -> dict[str, Any]:
        """What the image says of its streams: how many (QEMU's main stream
        and one per multifd channel; 1 = a single-stream save) and the
        bytes of QEMU's stream each holds."""
        info = self.fastsave.engine.inspect(str(path))
        lengths = list(getattr(info, "channel_lengths", ()) or (info.stream_length,))
        return {"image_streams": getattr(info, "channels", 1), "stream_bytes": info.stream_length,
                "channel_stream_bytes": lengths}

    def _migrate_out(self, dom: Any, fd: int) -> tuple[float, dict[str, Any]]:
        """getfd + migrate on a paused domain; polls until QEMU reports the end.
        Returns (time the migrate command returned, final query-migrate)."""
        from fastsave.virt import qmp

        try:
            qmp(dom, "getfd", {"fdname": "bench"}, fds=[fd])
        finally:
            os.close(fd)
        qmp(dom, "migrate", {"uri": "fd:bench"})
        t_mig = time.perf_counter()
        info = migration_end(dom)
        if info.get("status") != "completed":
            raise RuntimeError(f"QEMU migration {info.get('status')}: {info.get('error-desc')}")
        return t_mig, info

    def op_producer(self, name: str) -> dict[str, Any]:
        """QEMU migrating a paused guest into a pipe that is drained to /dev/null."""
        from fastsave.virt import qmp

        dom = self.dom(name)
        res: dict[str, Any] = {"boot_s": self.op_ensure_running(name)["boot_s"]}
        time.sleep(SETTLE)
        os.sync()
        watch = Watch(self.qemu_pid(name))
        r, w = os.pipe2(os.O_CLOEXEC)
        fcntl.fcntl(r, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        got = [0]

        def drain() -> None:
            null = os.open("/dev/null", os.O_WRONLY | os.O_CLOEXEC)
            try:
                while True:
                    try:
                        n = os.splice(r, null, PIPE_SIZE)
                    except OSError:
                        n = len(os.read(r, PIPE_SIZE))
                    if not n:
                        return
                    got[0] += n
            finally:
                os.close(null)
                os.close(r)

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        watch.start()
        t0 = time.perf_counter()
        try:
            dom.suspend()
            qmp(dom, "migrate-set-parameters", {"max-bandwidth": UNLIMITED_BANDWIDTH})
            t_mig, info = self._migrate_out(dom, w)
            t_done = time.perf_counter()
            reader.join(60)
            t_d0 = time.perf_counter()
            dom.destroy()
            t1 = time.perf_counter()
        finally:
            watch.stop()
        ram = info.get("ram", {})
        res.update(save_s=t1 - t0, stream_bytes=got[0], prepare_s=t_mig - t0,
                   stream_s=t_done - t_mig, destroy_s=t1 - t_d0, data_done_s=t_done - t0,
                   qemu_total_time_ms=info.get("total-time"), ram=ram,
                   save_watch=watch.summary(t0))
        return res

    def op_capture(self, name: str, path: str) -> dict[str, Any]:
        """The guest's migration stream, written by QEMU into a file in /dev/shm."""
        from fastsave.virt import qmp
        from testkit import guest

        dom = self.dom(name)
        self.op_ensure_running(name)
        time.sleep(SETTLE)
        state = guest.read_state(dom)
        dom.suspend()
        qmp(dom, "migrate-set-parameters", {"max-bandwidth": UNLIMITED_BANDWIDTH})
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        t0 = time.perf_counter()
        self._migrate_out(dom, fd)
        secs = time.perf_counter() - t0
        dom.destroy()
        return {"bytes": os.path.getsize(path), "boot_id": state.boot_id, "seconds": secs}

    def op_consumer(self, name: str, xml: str, path: str, boot_id: int) -> dict[str, Any]:
        """QEMU started paused with -incoming defer, fed the captured stream
        from memory through a pipe; timed until it runs the guest."""
        from fastsave.virt import qmp
        from testkit import guest

        libvirt = self.libvirt
        old = self._lookup(name + "-limit")
        if old is not None and old.isActive():
            old.destroy()
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        view = memoryview(mm)
        sum(view[i] for i in range(0, size, 4096))  # every page mapped before the clock starts
        os.sync()
        r, w = os.pipe2(os.O_CLOEXEC)
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)

        def feed() -> None:
            off = 0
            try:
                while off < size:
                    off += os.write(w, view[off:off + PIPE_SIZE])
            except OSError:
                pass
            finally:
                os.close(w)

        feeder = threading.Thread(target=feed, daemon=True)
        live = None
        res: dict[str, Any] = {"stream_bytes": size}
        mem = re.search(r"<memory unit='MiB'>(\d+)</memory>", xml)
        res["warm_s"] = warm_memory(int(mem.group(1)) * 1024 + WARM_EXTRA_KIB) if mem else None
        t0 = time.perf_counter()
        try:
            live = self.conn.createXML(with_incoming(xml), libvirt.VIR_DOMAIN_START_PAUSED)
            t_started = time.perf_counter()
            try:
                qmp(live, "getfd", {"fdname": "bench"}, fds=[r])
            finally:
                os.close(r)
                r = -1
            feeder.start()
            qmp(live, "migrate-incoming", {"uri": "fd:bench"})
            t_mig = time.perf_counter()
            info = migration_end(live)
            t_done = time.perf_counter()
            if info.get("status") != "completed":
                raise RuntimeError(f"incoming migration {info.get('status')}: "
                                   f"{info.get('error-desc')}")
            live.resume()
            t1 = time.perf_counter()
            feeder.join(60)
            state = guest.read_state(live)
            res.update(restore_s=t1 - t0, qemu_start_s=t_started - t0, stream_s=t_done - t_mig,
                       resume_s=t1 - t_done, state_ok=state.boot_id == boot_id)
            t_d = time.perf_counter()
            live.destroy()
            res["destroy_s"] = time.perf_counter() - t_d
        finally:
            if r >= 0:
                os.close(r)
            try:
                if live is not None and live.isActive():
                    live.destroy()
            except libvirt.libvirtError:
                pass  # a transient domain is gone once destroyed
            if feeder.is_alive():
                feeder.join(10)
            view.release()
            mm.close()
        return res


def agent_main(root: str, fmt: str | None) -> int:
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed goes to the log, never into the replies
    sys.stdout = sys.stderr
    agent = Agent(root, fmt)
    for line in sys.stdin:
        req = json.loads(line)
        op = req.pop("op")
        if op == "quit":
            replies.write(json.dumps({"ok": True, "result": {}}) + "\n")
            break
        try:
            reply = {"ok": True, "result": getattr(agent, "op_" + op)(**req)}
        except Exception as e:  # noqa: BLE001 - reported to the main process
            traceback.print_exc()
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        replies.write(json.dumps(reply) + "\n")
    agent.conn.close()
    return 0
