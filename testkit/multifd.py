"""QEMU's multi-channel migration (multifd) with bare QEMU: record each
channel of a save to its own file, and feed recorded channels back into a
fresh QEMU, one thread per channel. Socket handling is fastsave.channels'
(the product's), so these tests exercise it too."""
from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

from fastsave import channels

from .qemu_stream import MAX_BANDWIDTH, QemuVM, wait_migration


def supports_multifd(vm: QemuVM) -> bool:
    caps = vm.qmp.execute("query-migrate-capabilities")
    return any(c.get("capability") == "multifd" for c in caps)


def set_channels(vm: QemuVM, multifd: int) -> None:
    """0: the classic single stream; N: multifd with N channels."""
    vm.qmp.execute("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})
    if multifd:
        channels.pin_stream(lambda cmd, args: vm.qmp.execute(cmd, args), multifd)


def _copy(sock: socket.socket, out: str | None, counts: list[int], i: int,
          errors: list[BaseException]) -> None:
    try:
        f = open(out, "wb") if out else None
        try:
            while data := sock.recv(1 << 20):
                counts[i] += len(data)
                if f is not None:
                    f.write(data)
        finally:
            if f is not None:
                f.close()
    except BaseException as e:  # noqa: BLE001 - re-raised by the caller
        errors.append(e)


@dataclass
class Recording:
    paths: list[str]          # [main, multifd 0, ...]; empty when discarded
    sizes: list[int]
    seconds: float            # from `migrate` to every channel at EOF
    refused: list[int]        # pids of foreign connections that were closed


def record(vm: QemuVM, sock_dir: str, multifd: int, out_dir: str | None, *,
           timeout: float = 300, intruder: bool = False) -> Recording:
    """Migrates the paused `vm` to a unix socket in `sock_dir` with `multifd`
    channels (0: single stream over the same socket) and records channel i to
    out_dir/ch{i} (None: count and discard). `intruder`: another process of
    ours connects first; the peer check must refuse it."""
    assert vm.proc is not None
    set_channels(vm, multifd)
    path = os.path.join(sock_dir, "mig.sock")
    listener = channels.listen(path, multifd + 2)
    refused: list[int] = []
    try:
        if intruder:  # a local process racing QEMU for a channel
            bad = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            bad.connect(path)
            bad.sendall(channels.MULTIFD_MAGIC.to_bytes(4, "big") + bytes(60))
        start = time.monotonic()
        vm.qmp.execute("migrate", {"uri": f"unix:{path}"})

        def qemu_ok() -> None:
            st = vm.qmp.execute("query-migrate").get("status")
            if st in ("failed", "cancelled"):
                raise RuntimeError(f"QEMU migration {st}: {vm.log()}")
        socks = channels.accept_channels(listener, vm.proc.pid, multifd, timeout=60,
                                         check=qemu_ok, refused=refused)
    finally:
        listener.close()
        os.unlink(path)
        if intruder:
            bad.close()
    paths = [os.path.join(out_dir, f"ch{i}") for i in range(len(socks))] if out_dir else []
    counts, errors = [0] * len(socks), []
    threads = [threading.Thread(target=_copy, args=(s, paths[i] if paths else None, counts, i, errors),
                                daemon=True) for i, s in enumerate(socks)]
    for t in threads:
        t.start()
    try:
        wait_migration(vm, start + timeout)
        for t in threads:
            t.join(max(start + timeout - time.monotonic(), 1))
        if errors:
            raise errors[0]
        if any(t.is_alive() for t in threads):
            raise TimeoutError("a migration channel did not reach EOF")
        seconds = time.monotonic() - start
    finally:
        for s in socks:
            s.close()
    return Recording(paths, counts, seconds, refused)


def _feed(sock: socket.socket, path: str, errors: list[BaseException]) -> None:
    try:
        with open(path, "rb") as f:
            while data := f.read(1 << 20):
                sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except BaseException as e:  # noqa: BLE001 - re-raised by the caller
        errors.append(e)


def play(vm: QemuVM, sock_dir: str, paths: Sequence[str], *,
         timeout: float = 300) -> tuple[dict[str, Any], float]:
    """Feeds recorded channels [main, multifd 0, ...] into `vm` (started with
    incoming=True): same capabilities, `migrate-incoming unix:`, main
    connected first, every channel written by its own thread. Returns
    query-migrate at the end and the seconds it took."""
    assert vm.proc is not None
    multifd = len(paths) - 1
    set_channels(vm, multifd)
    path = os.path.join(sock_dir, "in.sock")
    start = time.monotonic()
    vm.qmp.execute("migrate-incoming", {"uri": f"unix:{path}"})
    socks = channels.connect_channels(path, vm.proc.pid, multifd)
    errors: list[BaseException] = []
    threads = [threading.Thread(target=_feed, args=(s, p, errors), daemon=True)
               for s, p in zip(socks, paths)]
    try:
        for t in threads:
            t.start()
        info = wait_migration(vm, start + timeout)
        seconds = time.monotonic() - start
        for t in threads:
            t.join(max(start + timeout - time.monotonic(), 1))
        if errors:
            raise errors[0]
    finally:
        for s in socks:
            s.close()
    return info, seconds
