"""A managed save running in a thread, for tests that hit it mid-way."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import libvirt

import fastsave


def save_in_thread(dom, **kw) -> tuple[threading.Thread, list]:
    """Starts fastsave.managed_save(dom, **kw) in a thread; the list gets
    None on success or the libvirtError it raised."""
    result: list = []

    def run() -> None:
        try:
            fastsave.managed_save(dom, **kw)
            result.append(None)
        except libvirt.libvirtError as e:
            result.append(e)

    t = threading.Thread(target=run)
    t.start()
    return t, result


def wait_until_writing(store: Path, t: threading.Thread, timeout: float = 60) -> None:
    """Returns once the engine writes its temp file into `store`."""
    deadline = time.monotonic() + timeout
    while not (store.exists() and any("fastsave-tmp" in p.name for p in store.iterdir())):
        assert time.monotonic() < deadline and t.is_alive(), "the save ended before it could be hit"
        time.sleep(0.002)
