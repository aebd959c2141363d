"""Benchmark producer: plays a saved stream into stdout, like QEMU migrating to a pipe.

usage: producer.py FILE SIZE RATE CTL_FD

Loads the first SIZE bytes of FILE into memory, then talks over the control
socket CTL_FD: sends b"R" when loaded, waits for b"G", writes the stream to
stdout as fast as it may and finally sends how many seconds the writing took.
RATE is in bytes per second; 0 means unthrottled. Throttling is a token bucket
refilled at RATE that holds at most one 4 MiB step, so a consumer that stalls
costs time that is never made up (as with a bandwidth-limited migration).
"""
from __future__ import annotations

import os
import socket
import sys
import time

STEP = 4 << 20


def load(path: str, size: int) -> memoryview:
    buf = bytearray(size)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        got = 0
        while got < size:
            n = f.readinto(view[got:])
            if not n:
                raise SystemExit(f"{path} is shorter than {size} bytes")
            got += n
    return view


def play(view: memoryview, rate: float) -> None:
    size, sent = len(view), 0
    tokens, last = float(STEP), time.perf_counter()
    while sent < size:
        n = min(STEP, size - sent)
        if rate:
            now = time.perf_counter()
            tokens = min(float(STEP), tokens + (now - last) * rate)
            last = now
            if tokens < n:
                time.sleep((n - tokens) / rate)
                continue
            tokens -= n
        end = sent + n
        while sent < end:
            sent += os.write(1, view[sent:end])


def main() -> None:
    path, size, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    view = load(path, size)
    ctl = socket.socket(fileno=int(sys.argv[4]))
    ctl.sendall(b"R")
    if ctl.recv(1) != b"G":
        return
    t0 = time.perf_counter()
    play(view, rate)
    os.close(1)
    ctl.sendall(f"{time.perf_counter() - t0:.6f}".encode())


if __name__ == "__main__":
    main()
