"""The restore flow: check the image, start QEMU from the domain's definition
waiting for an incoming stream, feed it the verified stream, remove the
image, resume. Runs under the domain's store lock.

Order, and what holds if the process dies at each step (the operation mark
says "restore"; recovery.py reads it):
  check image, bind, ABI            nothing started
  mark, createXML -incoming defer   dies: QEMU waits for a stream -> recovery destroys it,
  feed the stream                         the image is kept
  QEMU "completed"                  dies: the state lives in QEMU -> recovery removes the
  remove the image, resume                image and resumes as asked
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import libvirt

from . import channels, engine, restore_xml, trace, watch
from .saving import FD_NAME, STOP_TIMEOUT, cause_of, destroy
from .store import ImageStore, StoreError
from .virt import fail, qmp
from .worker import EngineProcess

__all__ = ["restore", "complete", "kept"]


def kept(path: str, name: str) -> str:
    """How a failed restore leaves the saved state, and the way out."""
    return (f"the image {path} is kept; start with VIR_DOMAIN_START_FORCE_BOOT "
            f"(fastsave start --force-boot {name}) to boot fresh")


def restore(dom: libvirt.virDomain, store: ImageStore, uuid: str, flags: int, opts: object,
            info: engine.ImageInfo, image_fd: int) -> None:
    """Restores the domain from the image open at `image_fd` (already checked
    by the caller: the store's file checks, `info` from engine.inspect and
    the binding). Takes ownership of image_fd. On failure the domain is shut
    off and the image kept; the error names the cause."""
    name = dom.name()
    path = store.image_path(uuid)
    keep = kept(path, name)
    try:
        try:
            xml = restore_xml.for_restore(info, dom, store.issue_token(uuid), store.scratch_path(uuid))
        except (restore_xml.RefusedImage, StoreError, OSError, libvirt.libvirtError) as e:
            store.revoke_token(uuid)
            raise fail(libvirt.VIR_ERR_OPERATION_FAILED,
                       f"cannot restore domain {name}: {e}; {keep}") from e
        resume = info.was_running and not flags & libvirt.VIR_DOMAIN_START_PAUSED
        store.mark_saving(uuid, {"op": "restore", "resume": resume, "pid": os.getpid()})
        # The image's channel count says how QEMU takes it: index 0 is the main channel.
        multifd = info.channels - 1
        _run(dom, store, uuid, flags, opts, xml, image_fd, path, keep, resume, multifd)
    except BaseException:
        os.close(image_fd)
        raise
    # The image's name is gone and the guest runs: the last close frees the
    # file's blocks (~0.1 s per GB on ext4), which need not hold up the caller.
    threading.Thread(target=os.close, args=(image_fd,), name="fastsave-free-image",
                     daemon=True).start()


def _run(dom: libvirt.virDomain, store: ImageStore, uuid: str, flags: int, opts: object, xml: str,
         image_fd: int, path: str, keep: str, resume: bool, multifd: int = 0) -> None:
    name = dom.name()
    uri = dom.connect().getURI()
    direct = opts.direct is True or bool(flags & libvirt.VIR_DOMAIN_START_BYPASS_CACHE)  # type: ignore[attr-defined]
    deadline = None if opts.timeout is None else time.monotonic() + opts.timeout  # type: ignore[attr-defined]
    worker: EngineProcess | None = None
    live: libvirt.virDomain | None = None
    multi: channels.RestoreChannels | None = None
    r = -1
    try:
        if multifd:  # QEMU listens (multifd needs a socket); the engine starts once it is fed
            watch.check_abort()
            trace.emit("restore.qemu-starting", name)
            live = dom.connect().createXML(xml, libvirt.VIR_DOMAIN_START_PAUSED)
            trace.emit("restore.qemu-started", name)
            multi = channels.RestoreChannels(live, multifd)
            multi.start()
            out_fds = multi.connect()
            try:
                worker = EngineProcess.restore(image_fd, out_fds, opts.progress,  # type: ignore[attr-defined]
                                               opts.engine_options(direct))  # type: ignore[attr-defined]
            finally:
                for fd in out_fds:
                    os.close(fd)
                multi.close()
            channels.destroy_if_engine_fails(live, worker)
        # The engine starts (and checks the image) while QEMU starts; it
        # blocks on the full pipe until QEMU reads.
        else:
            r, w = os.pipe2(os.O_CLOEXEC)
            try:
                worker = EngineProcess.restore(image_fd, w, opts.progress,  # type: ignore[attr-defined]
                                               opts.engine_options(direct))  # type: ignore[attr-defined]
            finally:
                os.close(w)
            watch.check_abort()
            trace.emit("restore.qemu-starting", name)
            live = dom.connect().createXML(xml, libvirt.VIR_DOMAIN_START_PAUSED)
            trace.emit("restore.qemu-started", name)
            try:
                qmp(live, "getfd", {"fdname": FD_NAME}, fds=[r])
            finally:
                os.close(r)
                r = -1
            channels.pin_stream(channels.qmp_call(live), 0)
            qmp(live, "migrate-incoming", {"uri": f"fd:{FD_NAME}"})
        trace.emit("restore.incoming", name)
        watch.wait_migration(live, worker, "incoming migration",
                             stall_timeout=opts.stall_timeout, deadline=deadline)  # type: ignore[attr-defined]
        trace.emit("restore.streamed", name)
        stats = worker.result(timeout=watch.WORKER_GRACE)
    except BaseException as e:
        if r >= 0:
            os.close(r)
        if multi is not None:
            multi.close()
        # QEMU did not start: its error is the cause, not the engine's broken pipe
        cause = (str(e) or type(e).__name__) if live is None else cause_of(e, worker)
        if worker is not None:
            worker.kill()
        left = ""
        if live is not None:
            err = destroy(live, uri, uuid, STOP_TIMEOUT)
            if err is not None:  # recovery destroys the waiting QEMU on the next call
                left = (f"; the half-started domain could not be stopped ({err}): the next "
                        f"fastsave call on it stops it")
        if not left:
            with contextlib.suppress(OSError):
                store.clear_saving_mark(uuid)
        store.revoke_token(uuid)
        raise fail(libvirt.VIR_ERR_OPERATION_FAILED,
                   f"restore of domain {name} from {path} failed: {cause}; {keep}{left}") from e
    store.revoke_token(uuid)
    if multi is not None:  # the guest runs on with one stream, as a plain start leaves it
        channels.unpin(channels.qmp_call(live), multi.changed)
    complete(live, store, uuid, resume)
    trace.emit("restore.done", name, stats=stats)
    store.clear_saving_mark(uuid)


def complete(live: libvirt.virDomain, store: ImageStore, uuid: str, resume: bool) -> None:
    """The state lives in QEMU now: the image is stale from here on. Removed
    (durably, libvirt's link to a published image first: store.remove_image)
    before the guest may run. Also how recovery finishes a restore
    whose process died after the stream was in."""
    store.remove_image(uuid)
    restore_xml.unbind_definition(live)
    if resume and live.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
        live.resume()

