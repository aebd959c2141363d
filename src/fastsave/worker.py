"""The engine in a child process.

A managed save runs the engine in a child so that the controlling process
outlives it: if the child dies, QEMU's migration fails and the controller
resumes the guest. The child dies with its parent (PR_SET_PDEATHSIG), so an
orphaned save never completes behind a controller that is gone.

The child runs as root, so nothing of the caller's working directory or
environment may reach it: it is started as `python -I` (no working directory
or script directory on sys.path, PYTHON* variables and the user's site
ignored), in "/", with a fixed minimal environment, and a bootstrap that loads
the very fastsave package this process imported (by its directory, without
putting that directory on sys.path), whatever the install layout.

Protocol: the JSON job comes on the child's stdin, read to EOF (never in argv:
it holds the domain XML with its secrets, and may exceed the size of one
argument): the operation, the image path, the stream fds ("fds", one per
channel, inherited at the same numbers), the engine options
(`engine.EngineOptions.to_dict()`) and the call's other arguments ("kw"). stdout carries JSON lines, {"progress": stats} while running and one
final {"ok": true, "stats": ...} or {"ok": false, "type": ..., "message": ...}
with errno/filename/filename2 for an OSError and path/offset/chunk for an
ImageError, so the parent raises the same exception with the same details.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from . import engine, errors

__all__ = ["EngineProcess", "CHILD_ENV"]

# The directory of the fastsave package this process runs (fixed at import,
# before anyone changes the working directory).
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

# All the environment the child gets: nothing of the caller's.
CHILD_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}

# Loads the package from the directory given as argv[1] (the parent's), then
# runs the worker. Only the package itself comes from there: its directory is
# not added to sys.path, so nothing else in it can shadow a module.
def bootstrap(module: str, call: str) -> str:
    """`python -I -c` text that loads fastsave from the directory in argv[1]
    and runs `fastsave.MODULE.CALL` as the exit status (also the hook's)."""
    return ("import sys, importlib.util as u\n"
            "d = sys.argv[1]\n"
            's = u.spec_from_file_location("fastsave", d + "/__init__.py", '
            "submodule_search_locations=[d])\n"
            "m = u.module_from_spec(s)\n"
            'sys.modules["fastsave"] = m\n'
            "s.loader.exec_module(m)\n"
            f"import fastsave.{module}\n"
            f"sys.exit(fastsave.{module}.{call})\n")


_BOOTSTRAP = bootstrap("worker", "main()")

_IMAGE_ERRORS: dict[str, type[errors.ImageError]] = {
    cls.__name__: cls for cls in (
        errors.ImageError, errors.ImageCorrupt, errors.ImageTruncated,
        errors.UnsupportedImageVersion, errors.NotAnImage,
    )
}
_ERRORS: dict[str, type[Exception]] = {
    cls.__name__: cls for cls in (errors.Cancelled, errors.FastsaveError, ValueError, MemoryError)
}


class EngineProcess:
    """Parent side: start, watch, kill and collect one engine child.

    `last_stats` is the latest `engine.Stats` the child reported (None before
    the first), `last_advance` the `time.monotonic()` at which its bytes_in or
    bytes_out last grew (the start time until they do): what a stall watchdog
    needs. A progress callback that raises is not called again; its exception
    is kept in `callback_error` and the child's output is still drained.
    """

    def __init__(self, job: dict[str, Any], fds: int | Sequence[int],
                 progress: Callable[[engine.Stats], None] | None = None,
                 keep_fds: tuple[int, ...] = ()) -> None:
        fds = [fds] if isinstance(fds, int) else list(fds)
        job = dict(job, fds=fds, parent=os.getpid())
        if "path" in job:  # the child runs in "/"
            job["path"] = os.path.abspath(os.fspath(job["path"]))
        data = json.dumps(job, default=str).encode()
        self._progress = progress
        self._final: dict[str, Any] | None = None
        self.callback_error: BaseException | None = None
        self.last_stats: engine.Stats | None = None
        self.last_advance = time.monotonic()
        self._high = (0, 0)
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _BOOTSTRAP, _PACKAGE_DIR],
            pass_fds=[*fds, *keep_fds], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            close_fds=True, cwd="/", env=dict(CHILD_ENV),
        )
        self._reader = threading.Thread(target=self._read, name="fastsave-worker-out", daemon=True)
        self._reader.start()
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.close()
        except BrokenPipeError:  # the child died first: result() says how
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass

    @classmethod
    def save(cls, in_fds: int | Sequence[int], path: str,
             progress: Callable[[engine.Stats], None] | None = None,
             options: engine.EngineOptions | None = None, **kw: Any) -> EngineProcess:
        """`in_fds`: one fd or one per channel. Engine options come as
        `options`, or as their keywords (mode=, level=, ...), which override
        it; the other keywords (xml=, name=, uuid=, was_running=) go to
        `engine.save_stream`. Options are checked here, before the child starts."""
        names = {f.name for f in dataclasses.fields(engine.EngineOptions)}
        opts = (options or engine.EngineOptions()).with_overrides(
            **{k: v for k, v in kw.items() if k in names})
        rest = {k: v for k, v in kw.items() if k not in names}
        return cls({"op": "save", "path": path, "options": opts.to_dict(), "kw": rest}, in_fds,
                   progress)

    @classmethod
    def restore(cls, image_fd: int, out_fds: int | Sequence[int],
                progress: Callable[[engine.Stats], None] | None = None,
                options: engine.EngineOptions | None = None, **kw: Any) -> EngineProcess:
        """The child reads the very file the parent opened and checked.
        `out_fds`: one per channel of the image; keywords threads=, direct=,
        slots= override `options`."""
        job: dict[str, Any] = {"op": "restore", "path": f"/proc/self/fd/{image_fd}", "kw": kw}
        if options is not None:
            job["options"] = options.to_dict()
        return cls(job, out_fds, progress, keep_fds=(image_fd,))

    def _read(self) -> None:
        """Drains the child's stdout to EOF, whatever a message or a callback does."""
        stdout = self.proc.stdout
        assert stdout is not None
        try:
            for line in stdout:
                try:
                    msg = json.loads(line)
                    if not isinstance(msg, dict):
                        continue
                    if "progress" in msg:
                        self._note(engine.Stats(**msg["progress"]), call=True)
                    elif "ok" in msg:
                        if msg.get("ok"):
                            self._note(engine.Stats(**msg["stats"]), call=False)
                        self._final = msg
                except (ValueError, TypeError, KeyError):
                    continue  # not a message of ours: keep reading
        finally:
            stdout.close()

    def _note(self, stats: engine.Stats, call: bool) -> None:
        hi_in, hi_out = self._high
        if stats.bytes_in > hi_in or stats.bytes_out > hi_out:
            self._high = (max(hi_in, stats.bytes_in), max(hi_out, stats.bytes_out))
            self.last_advance = time.monotonic()
        self.last_stats = stats
        cb = self._progress
        if call and cb is not None:
            try:
                cb(stats)
            except BaseException as e:  # noqa: BLE001 - kept for the caller; draining goes on
                self.callback_error = e
                self._progress = None

    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.running():
            self.proc.kill()

    def result(self, timeout: float | None = None) -> engine.Stats:
        """Waits for the child; returns its stats or raises what it raised.

        With a timeout, raises subprocess.TimeoutExpired once it has passed,
        whether the child still runs or its output is not yet all read.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        self.proc.wait(timeout)
        self._reader.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if self._reader.is_alive():
            raise subprocess.TimeoutExpired(self.proc.args, timeout or 0.0)
        msg = self._final
        if msg is None:
            sig = -self.proc.returncode if self.proc.returncode < 0 else 0
            why = f"killed by signal {signal.Signals(sig).name}" if sig else \
                f"exited with status {self.proc.returncode}"
            raise errors.FastsaveError(f"the engine process {why} before finishing")
        if msg.get("ok"):
            return engine.Stats(**msg["stats"])
        raise _exception(msg)


def _exception(msg: dict[str, Any]) -> BaseException:
    """The exception the child reported, rebuilt with its details."""
    kind = str(msg.get("type", "FastsaveError"))
    text = str(msg.get("message", "engine failed"))
    if msg.get("oserror"):
        if msg.get("errno") is None:
            return OSError(text)
        # OSError(errno, ...) picks the subclass (FileNotFoundError, ...) itself.
        return OSError(msg["errno"], text, msg.get("filename"), None, msg.get("filename2"))
    if kind in _IMAGE_ERRORS:
        return _IMAGE_ERRORS[kind](text, msg.get("path"), msg.get("offset"), msg.get("chunk"))
    if kind in _ERRORS:
        return _ERRORS[kind](text)
    return errors.FastsaveError(f"{kind}: {text}")


def _describe(e: BaseException) -> dict[str, Any]:
    """The final message for an exception: its kind and the details to rebuild it."""
    msg: dict[str, Any] = {"ok": False, "type": type(e).__name__}
    if isinstance(e, OSError):
        msg.update(oserror=True, errno=e.errno, message=e.strerror if e.errno is not None else str(e),
                   filename=_plain(e.filename), filename2=_plain(e.filename2))
    else:
        msg["message"] = str(e)
        if isinstance(e, errors.ImageError):
            msg.update(path=_plain(e.path), offset=e.offset, chunk=e.chunk)
    return msg


def _plain(v: object) -> str | int | None:
    if v is None or isinstance(v, (str, int)):
        return v
    if isinstance(v, bytes):
        return os.fsdecode(v)
    return str(v)


def _die_with_parent(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


_emit_lock = threading.Lock()


def _emit(msg: dict[str, Any]) -> None:
    line = json.dumps(msg) + "\n"
    with _emit_lock:
        sys.stdout.write(line)
        sys.stdout.flush()


def _read_job() -> dict[str, Any]:
    """The job from stdin, to EOF; stdin is then /dev/null."""
    data = sys.stdin.buffer.read()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    job = json.loads(data)
    if not isinstance(job, dict):
        raise ValueError("the engine job is not a JSON object")
    return job


def main() -> int:
    try:
        job = _read_job()
        _die_with_parent(job["parent"])
        kw = dict(job.get("kw", {}))
        kw["progress"] = lambda s: _emit({"progress": dataclasses.asdict(s)})
        kw.setdefault("progress_interval", 0.25)
        options = engine.EngineOptions.from_dict(job["options"]) if "options" in job else None
        if job["op"] == "save":
            stats = engine.save_stream(job["fds"], job["path"], options, **kw)
        else:
            stats = engine.restore_stream(job["path"], job["fds"], options, **kw)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        _emit(_describe(e))
        return 1
    _emit({"ok": True, "stats": dataclasses.asdict(stats)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
