"""Drive real QEMU to produce and consume migration streams."""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Any, BinaryIO, Callable, Sequence

from .qmp import QMPClient

QEMU = os.environ.get("FASTSAVE_QEMU", "qemu-system-x86_64")
MAX_BANDWIDTH = 64 << 30  # bytes/s; effectively unlimited


class QemuVM:
    """A paused (-S) TCG guest in a private temp dir, controlled over QMP."""

    def __init__(self, *, mem_mib: int = 64, fill_path: str | os.PathLike[str] | None = None,
                 fill_addr: int = 0x1000000, incoming: bool = False,
                 extra_args: Sequence[str] = (), timeout: float = 30.0) -> None:
        self.mem_mib, self.timeout = mem_mib, timeout
        self.dir = tempfile.mkdtemp(prefix="fastsave-qemu-")
        sock = os.path.join(self.dir, "qmp.sock")
        self.args = [QEMU, "-machine", "pc,accel=tcg", "-m", str(mem_mib),
                     "-nodefaults", "-display", "none", "-S",
                     "-qmp", f"unix:{sock},server=on,wait=off", *extra_args]
        if fill_path is not None:
            self.args += ["-device", f"loader,file={os.fspath(fill_path).replace(',', ',,')},"
                          f"addr={fill_addr:#x},force-raw=on"]
        if incoming:
            self.args += ["-incoming", "defer"]
        self._sock = sock
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: QMPClient = None  # type: ignore[assignment]  # set by start()

    def start(self) -> "QemuVM":
        log = open(os.path.join(self.dir, "qemu.log"), "wb")
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        try:
            self.qmp = QMPClient(self._sock, timeout=self.timeout,
                                 alive=lambda: self.proc.poll() is None)  # type: ignore[union-attr]
        except Exception as e:
            text = self.log()  # read before stop() removes the dir
            self.stop()
            raise RuntimeError(f"QEMU failed to start: {e}; log: {text}") from e
        return self

    def log(self) -> str:
        try:
            with open(os.path.join(self.dir, "qemu.log"), errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.qmp is not None:
            try:
                self.qmp.execute("quit", timeout=10)
            except Exception:
                pass  # QEMU may hang up before answering "quit"
            self.qmp.close()
            self.qmp = None  # type: ignore[assignment]
        if self.proc is not None:
            try:
                self.proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "QemuVM":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _pipe() -> tuple[int, int]:
    r, w = os.pipe()
    try:  # bigger pipe, fewer wakeups; the default size works too
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 20)
    except OSError:
        pass
    return r, w


def _thread(fn: Callable[[], None]) -> tuple[threading.Thread, list[BaseException]]:
    # Run fn in a daemon thread and keep its exception for the caller.
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - re-raised by caller
            errors.append(e)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, errors


def wait_migration(vm: QemuVM, deadline: float) -> dict[str, Any]:
    """Poll query-migrate until completed; raise on failure or timeout."""
    while True:
        try:
            info: dict[str, Any] = vm.qmp.execute("query-migrate")
        except ConnectionError as e:  # a destination QEMU exits when loading fails
            raise RuntimeError(f"QEMU went away during migration: {e}; {vm.log()}") from e
        status = info.get("status")
        if status == "completed":
            return info
        if status == "failed":
            raise RuntimeError(f"migration failed: {info.get('error-desc')}; {vm.log()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"migration still {status!r}")
        time.sleep(0.02)


def save_stream(vm: QemuVM, out_path: str | os.PathLike[str], *, timeout: float = 120) -> int:
    """Migrate a running QemuVM into out_path; returns bytes written."""
    deadline = time.monotonic() + timeout
    r, w = _pipe()
    try:
        vm.qmp.execute("getfd", {"fdname": "fs"}, fds=[w])
    finally:
        os.close(w)  # QEMU holds its own dup; ours would keep EOF from coming
    written = [0]

    def drain() -> None:
        with open(r, "rb", buffering=0) as src, open(out_path, "wb") as dst:
            while chunk := src.read(1 << 20):
                written[0] += dst.write(chunk)
    t, errors = _thread(drain)
    vm.qmp.execute("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})
    vm.qmp.execute("migrate", {"uri": "fd:fs"})
    wait_migration(vm, deadline)
    t.join(max(deadline - time.monotonic(), 1))
    if errors:
        raise errors[0]
    if t.is_alive():
        raise TimeoutError("migration stream did not reach EOF")
    return written[0]


def capture_migration_stream(out_path: str | os.PathLike[str], *, mem_mib: int = 64,
                             fill_path: str | os.PathLike[str] | None = None,
                             fill_addr: int = 0x1000000, timeout: float = 120) -> int:
    with QemuVM(mem_mib=mem_mib, fill_path=fill_path, fill_addr=fill_addr) as vm:
        return save_stream(vm, out_path, timeout=timeout)


def load_stream(vm: QemuVM, stream: str | os.PathLike[str] | int, *,
                timeout: float = 120) -> dict[str, Any]:
    """Feed a stream (path or readable fd) into a VM started with incoming=True."""
    deadline = time.monotonic() + timeout
    r, w = _pipe()
    try:
        vm.qmp.execute("getfd", {"fdname": "fs"}, fds=[r])
    finally:
        os.close(r)

    def feed() -> None:
        src: BinaryIO = (open(stream, "rb", closefd=False) if isinstance(stream, int)
                         else open(stream, "rb"))
        with src, open(w, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    t, errors = _thread(feed)
    vm.qmp.execute("migrate-incoming", {"uri": "fd:fs"})
    info = wait_migration(vm, deadline)
    t.join(max(deadline - time.monotonic(), 1))
    if errors:
        raise errors[0]
    return info


def feed_incoming_stream(stream: str | os.PathLike[str] | int, *, mem_mib: int = 64,
                         timeout: float = 120) -> dict[str, Any]:
    """Load a stream into a fresh QEMU; returns its query-status afterwards."""
    with QemuVM(mem_mib=mem_mib, incoming=True) as vm:
        load_stream(vm, stream, timeout=timeout)
        return vm.qmp.execute("query-status")  # type: ignore[no-any-return]


def ram_sha256(vm: QemuVM, size: int, *, addr: int = 0) -> str:
    """sha256 of guest-physical [addr, addr+size) via pmemsave."""
    path = os.path.join(vm.dir, f"pmem-{addr:x}-{size:x}.bin")
    vm.qmp.execute("pmemsave", {"val": addr, "size": size, "filename": path})
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    os.unlink(path)
    return h.hexdigest()
