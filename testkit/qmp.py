"""QMP for QEMU processes started without libvirt (the engine tests capture
real migration streams this way). Guests under libvirt use fastsave.virt.qmp,
the one the product uses."""
from __future__ import annotations

import json
import socket
import time
from typing import Any, Callable, Sequence


class QMPError(Exception):
    """QEMU answered a command with an "error" object."""


class QMPClient:
    def __init__(self, path: str, *, timeout: float = 30.0,
                 alive: Callable[[], bool] | None = None) -> None:
        self.events: list[dict[str, Any]] = []
        self._buf = b""
        self._sock = self._connect(path, timeout, alive)
        self.greeting = self._read_msg(timeout)
        self.execute("qmp_capabilities")

    @staticmethod
    def _connect(path: str, timeout: float,
                 alive: Callable[[], bool] | None) -> socket.socket:
        # QEMU creates the socket some time after exec; retry until it exists,
        # but give up early if the process already died.
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
                return sock
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if alive is not None and not alive():
                    raise ConnectionError(f"QEMU exited before {path} appeared")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"QMP socket {path} not ready")
                time.sleep(0.05)

    def _read_msg(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("QMP reply timed out")
            self._sock.settimeout(left)
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("QMP connection closed")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line) if line.strip() else self._read_msg(timeout)

    def execute(self, cmd: str, args: dict[str, Any] | None = None,
                fds: Sequence[int] | None = None, timeout: float = 60.0) -> Any:
        msg: dict[str, Any] = {"execute": cmd}
        if args:
            msg["arguments"] = args
        data = json.dumps(msg).encode() + b"\n"
        if fds:
            # getfd/add-fd take the descriptor from SCM_RIGHTS on the same
            # message that carries the command bytes.
            socket.send_fds(self._sock, [data], list(fds))
        else:
            self._sock.sendall(data)
        while True:
            reply = self._read_msg(timeout)
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                raise QMPError(reply["error"].get("desc", str(reply["error"])))
            elif "return" in reply:
                return reply["return"]

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "QMPClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
