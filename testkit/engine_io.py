"""Feed bytes into the engine through a real pipe and collect what it gives back."""
from __future__ import annotations

import os
import threading
from typing import Any

from fastsave import engine


def _pump_in(w: int, data: bytes, errors: list[BaseException]) -> None:
    try:
        view = memoryview(data)
        while view:
            n = os.write(w, view[: 1 << 20])
            view = view[n:]
    except BrokenPipeError:
        pass  # the engine stopped reading: its own error is what the test checks
    except BaseException as e:  # noqa: BLE001 - handed to the test thread
        errors.append(e)
    finally:
        os.close(w)


def save_bytes(data: bytes, path: str | os.PathLike[str], **kw: Any) -> engine.Stats:
    """Saves `data` as the stream of a pipe into the image at `path`."""
    r, w = os.pipe()
    errors: list[BaseException] = []
    t = threading.Thread(target=_pump_in, args=(w, data, errors))
    t.start()
    try:
        return engine.save_stream(r, path, **kw)
    finally:
        os.close(r)
        t.join()
        if errors:
            raise errors[0]


def restore_collect(path: str | os.PathLike[str], **kw: Any) -> tuple[bytes, BaseException | None]:
    """Restores into a pipe; returns what came out and the error, if any."""
    r, w = os.pipe()
    out = bytearray()

    def drain() -> None:
        while chunk := os.read(r, 1 << 20):
            out.extend(chunk)

    t = threading.Thread(target=drain)
    t.start()
    err: BaseException | None = None
    try:
        engine.restore_stream(path, w, **kw)
    except Exception as e:  # noqa: BLE001 - returned to the caller
        err = e
    finally:
        os.close(w)
        t.join()
        os.close(r)
    return bytes(out), err


def restore_bytes(path: str | os.PathLike[str], **kw: Any) -> bytes:
    out, err = restore_collect(path, **kw)
    if err is not None:
        raise err
    return out
