"""Several migration channels between QEMU and the engine (QEMU's multifd).

QEMU sends a guest's memory over N parallel connections when the migration
capability `multifd` is on and the parameter `multifd-channels` is N. This
needs a socket URI (`unix:PATH`; QEMU 7.2 cannot do multifd over `fd:`). The
main channel carries the device state and the stream's framing and begins
with QEMU_VM_FILE_MAGIC; each multifd channel begins with a 64-byte init
packet (magic 0x11223344, version, QEMU's -uuid, channel id) and carries
pages. Channel order in fastsave: index 0 = main, 1..N = multifd ids 0..N-1.

Save: fastsave listens on a socket in a private directory, QEMU connects
(main first, then the N channels, in any order), and every accepted
connection must come from the domain's own QEMU (SO_PEERCRED pid); a
connection from any other process is closed and does not count. Restore:
QEMU listens (`migrate-incoming unix:PATH`) and fastsave connects main first
(QEMU 7.2 takes the first connection for the main channel), then channel
ids 0..N-1, after checking that the listener is that QEMU. The receiving
side checks the uuid in each init packet against its own -uuid, which
libvirt sets to the domain's UUID, so an image restores into its own domain.

Where the sockets live: `SOCKET_ROOT` (root's, 0711, on tmpfs) holds one
directory per operation, mode 0700 and owned by QEMU's user (found from the
QEMU process), so only QEMU's user and root can reach the socket, and the
peer check leaves QEMU alone. A confining security driver (AppArmor,
SELinux) must also let QEMU connect to or create a socket there; where it
does not, QEMU's migration fails at once with its reason and the save or
restore is rolled back as any other failure.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import socket
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Callable

from ._native import lib
from .errors import FastsaveError

log = logging.getLogger("fastsave")

__all__ = ["ChannelError", "MAIN_MAGIC", "MULTIFD_MAGIC", "INIT_SIZE", "MAX_CHANNELS",
           "SOCKET_ROOT", "SocketDir", "listen", "accept_channels", "connect_channels",
           "classify", "peer_pid", "qemu_pid", "KEPT_CAPABILITIES", "pin_stream", "unpin", "qmp_call",
           "domain_qemu_pid",
           "SaveChannels", "RestoreChannels", "check_migration", "check_count",
           "CPUS_PER_CHANNEL", "AUTO_MAX_CHANNELS", "auto_count", "confined", "choose_count",
           "destroy_if_engine_fails"]

MAIN_MAGIC = 0x5145564D      # "QEVM", QEMU_VM_FILE_MAGIC
MULTIFD_MAGIC = 0x11223344
INIT_SIZE = 64               # MultiFDInit_t: magic, version, uuid[16], id, 7 + 32 unused
_INIT_HEAD = struct.Struct(">II16sB")
MAX_CHANNELS = lib.FS_CHANNELS_MAX - 1  # multifd channels an image holds beside the main one
SOCKET_ROOT = "/run/fastsave/channels"
SOCKET_NAME = "migration.sock"
ACCEPT_TIMEOUT = 30.0


class ChannelError(FastsaveError):
    """The migration channels could not be set up."""


# -- where the sockets live ------------------------------------------------------

def _safe_root(root: str) -> None:
    """Creates `root` (and its parent) root-owned 0711, or refuses one anyone
    else could write into: a socket directory must not be swappable."""
    for d in (os.path.dirname(root), root):
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, 0o711)
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise ChannelError(f"{d} is not a directory owned by this user and writable only "
                               "by it; refusing to put migration sockets there")


class SocketDir:
    """A private directory for one operation's socket, owned by QEMU's user
    (uid, gid of its process) with mode 0700; removed by close()."""

    def __init__(self, qemu_pid: int, root: str = SOCKET_ROOT) -> None:
        _safe_root(root)
        st = os.stat(f"/proc/{qemu_pid}")  # a process's /proc entry belongs to its euid
        self.path = tempfile.mkdtemp(prefix="op-", dir=root)
        try:
            os.chown(self.path, st.st_uid, st.st_gid)
        except BaseException:
            os.rmdir(self.path)
            raise
        self.uid, self.gid = st.st_uid, st.st_gid
        self.socket = os.path.join(self.path, SOCKET_NAME)

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> SocketDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- who is on the other end -----------------------------------------------------

def peer_pid(sock: socket.socket) -> int:
    """The pid of the process that connected (or listened), from the kernel."""
    pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                           struct.calcsize("3i")))
    return pid


def qemu_pid(pid_file: str, uuid: str) -> int:
    """The pid in libvirt's pid file for a domain, checked against the
    process: it must be running with the domain's -uuid."""
    try:
        with open(pid_file) as f:
            pid = int(f.read().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except (OSError, ValueError) as e:
        raise ChannelError(f"cannot find the domain's QEMU process ({pid_file}: {e})") from e
    if uuid.encode() not in argv:
        raise ChannelError(f"process {pid} from {pid_file} is not the domain's QEMU "
                           f"(no -uuid {uuid})")
    return pid


# -- classifying a connection by its first bytes ---------------------------------

def classify(sock: socket.socket, deadline: float) -> int:
    """-1 for the main channel, else the multifd channel id. Peeks, so the
    bytes stay in the socket for whoever reads the stream."""
    need = 4
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([sock], [], [], left)[0]:
            raise ChannelError("a migration connection sent no channel header in time")
        head = sock.recv(need, socket.MSG_PEEK)
        if len(head) >= 4:
            magic = struct.unpack_from(">I", head)[0]
            if magic == MAIN_MAGIC:
                return -1
            if magic != MULTIFD_MAGIC:
                raise ChannelError(f"a migration connection began with 0x{magic:08x}, "
                                   "neither a migration stream nor a multifd channel")
            if len(head) >= _INIT_HEAD.size:
                return _INIT_HEAD.unpack_from(head)[3]
            need = _INIT_HEAD.size
        if len(head) == 0:
            raise ChannelError("a migration connection closed before its channel header")
        if len(head) < need:
            time.sleep(0.001)  # the rest of the header is on its way


# -- save: QEMU connects to us ---------------------------------------------------

def listen(path: str, backlog: int) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def accept_channels(listener: socket.socket, pid: int, multifd: int, *,
                    timeout: float = ACCEPT_TIMEOUT, check: Callable[[], None] | None = None,
                    refused: list[int] | None = None) -> list[socket.socket]:
    """Accepts the main channel and `multifd` multifd channels from process
    `pid`; returns them ordered [main, id 0, ..., id multifd-1]. Connections
    from other processes are closed (their pids appended to `refused`).
    `check` is called while waiting (it raises to stop, e.g. QEMU failed)."""
    got: dict[int, socket.socket] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(got) < multifd + 1:
            if check is not None:
                check()
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChannelError(f"QEMU opened {len(got)} of {multifd + 1} migration channels "
                                   f"within {timeout:g} s")
            if not select.select([listener], [], [], min(left, 0.1))[0]:
                continue
            conn, _ = listener.accept()
            conn.set_inheritable(False)
            who = peer_pid(conn)
            if who != pid:
                conn.close()
                if refused is not None:
                    refused.append(who)
                continue
            try:
                kind = classify(conn, deadline)
                if kind in got or not -1 <= kind < multifd:
                    raise ChannelError(f"QEMU opened an unexpected migration channel ({kind})")
            except BaseException:
                conn.close()
                raise
            got[kind] = conn
    except BaseException:
        for c in got.values():
            c.close()
        raise
    return [got[k] for k in range(-1, multifd)]


# -- restore: we connect to QEMU -------------------------------------------------

def connect_channels(path: str, pid: int, multifd: int, *,
                     timeout: float = ACCEPT_TIMEOUT) -> list[socket.socket]:
    """Connects main first, then channels 0..multifd-1, to the socket QEMU
    (process `pid`) listens on. QEMU 7.2 takes the first connection it
    accepts for the main channel, and accepts in connection order."""
    out: list[socket.socket] = []
    deadline = time.monotonic() + timeout
    try:
        for _ in range(multifd + 1):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            out.append(s)
            while True:
                try:
                    s.connect(path)
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    if time.monotonic() > deadline:
                        raise ChannelError(f"QEMU is not listening on {path}") from None
                    time.sleep(0.01)
            who = peer_pid(s)
            if who != pid:
                raise ChannelError(f"the migration socket {path} belongs to process {who}, "
                                   f"not to the domain's QEMU ({pid})")
    except BaseException:
        for s in out:
            s.close()
        raise
    return out


# -- QEMU's settings -------------------------------------------------------------

QmpCall = Callable[..., object]


def check_count(channels: object) -> int:
    """Options.channels: 1 (one stream) or the number of multifd channels."""
    if isinstance(channels, bool) or not isinstance(channels, int) \
            or not 1 <= channels <= MAX_CHANNELS:
        raise ChannelError(f"channels must be an integer from 1 to {MAX_CHANNELS}, "
                           f"not {channels!r}, or None (chosen per save)")
    return channels


# The channel count a save gets when none is asked for (Options.channels None).
# Each channel costs a QEMU sender thread (and, from QEMU 9, its zero-page
# scan) and an engine reader that checksums and compresses what it reads: about
# two busy CPUs while the disk keeps up. Measured on a 2-CPU machine (1.5 GiB
# guest, QEMU 7.2): 2 channels saved in 1.3-1.4x the time of one stream, 4 in
# 1.15-1.45x, and restores gained nothing (docs/architecture.md), so a save gets a second channel only
# from 8 CPUs of its own (4 per channel: the guest's own threads, the engine's
# writer and the kernel's page-cache and teardown work need the rest), and at
# most AUTO_MAX_CHANNELS (one disk is rarely faster than 16 x 0.5-1 GB/s).
CPUS_PER_CHANNEL = 4
AUTO_MAX_CHANNELS = 16


def auto_count(cpus: int) -> int:
    """The channel count for a save that may use `cpus` CPUs."""
    n = max(1, cpus) // CPUS_PER_CHANNEL
    return 1 if n < 2 else min(n, AUTO_MAX_CHANNELS, MAX_CHANNELS)


def confined(domain_xml: str) -> str | None:
    """The security model confining the domain's QEMU (AppArmor, SELinux), if
    any: such a QEMU may not reach fastsave's socket, so a save whose channel
    count fastsave chooses keeps to one stream for it."""
    import xml.etree.ElementTree as ET
    try:
        root = ET.fromstring(domain_xml)
    except ET.ParseError:
        return "unknown"
    for label in root.findall("seclabel"):
        model = label.get("model", "")
        if label.get("type") != "none" and model in ("apparmor", "selinux"):
            return model
    return None


def choose_count(dom: object, requested: int | None, cpus: int) -> int:
    """The channel count of one save: `requested` as given (checked), or for
    None: auto_count(cpus), kept to 1 where this QEMU has no multifd or its
    process is confined."""
    if requested is not None:
        return check_count(requested)
    n = auto_count(cpus)
    if n == 1:
        return 1
    from .virt import qmp
    caps = qmp(dom, "query-migrate-capabilities") or []  # type: ignore[arg-type]
    if not any(c.get("capability") == "multifd" for c in caps):  # type: ignore[union-attr]
        return 1
    if confined(dom.XMLDesc(0)):  # type: ignore[attr-defined]
        return 1
    return n


# Capabilities fastsave leaves as they are. Every other one that is on is
# turned off for a stream fastsave takes or feeds: another tool may have left
# it on (a guest restored by libvirt's parallel save keeps mapped-ram and
# multifd, and QEMU then refuses a migration to an fd), and the others change
# the stream in ways both sides must share (compression, bitmaps, postcopy),
# leave memory out of it (x-ignore-shared) or stop it halfway
# (pause-before-switchover, return-path over a one-way pipe). libvirt follows
# migration events, so "events" stays.
KEPT_CAPABILITIES = frozenset({"events"})


def pin_stream(qmp: QmpCall, multifd: int) -> dict[str, bool]:
    """Sets QEMU's migration settings for a stream fastsave takes or feeds:
    multifd on with `multifd` channels (0: off), every other capability but
    KEPT_CAPABILITIES off, and, where this QEMU has them, the parameters
    multifd-compression "none" and mode "normal". Returns the capabilities
    it changed with their old state, for unpin()."""
    if multifd:
        check_count(multifd)
    caps = {c["capability"]: bool(c["state"])
            for c in qmp("query-migrate-capabilities", None) or []}  # type: ignore[union-attr]
    want = {name: False for name, on in caps.items() if on and name not in KEPT_CAPABILITIES}
    want["multifd"] = bool(multifd)
    changed = {k: caps.get(k, False) for k, v in want.items() if caps.get(k, False) != v}
    if changed:
        qmp("migrate-set-capabilities",
            {"capabilities": [{"capability": k, "state": want[k]} for k in changed]})
    params = qmp("query-migrate-parameters", None) or {}
    pinned: dict[str, object] = {"multifd-channels": multifd} if multifd else {}
    if params.get("multifd-compression", "none") != "none":  # type: ignore[union-attr]
        pinned["multifd-compression"] = "none"
    if params.get("mode", "normal") != "normal":  # type: ignore[union-attr]
        pinned["mode"] = "normal"
    if pinned:
        qmp("migrate-set-parameters", pinned)
    return changed


def unpin(qmp: QmpCall, changed: dict[str, bool]) -> None:
    """Puts back the capabilities pin_stream changed (best effort: a guest
    that runs on is left as it was; libvirt sets its own capabilities before
    its own migrations)."""
    if changed:
        with contextlib.suppress(Exception):
            qmp("migrate-set-capabilities",
                {"capabilities": [{"capability": k, "state": v} for k, v in changed.items()]})


# -- a libvirt domain's QEMU ------------------------------------------------------

def _pid_file(dom: object) -> str:
    """libvirt's pid file for the domain's QEMU (its QEMU driver's state dir)."""
    from .virt import connection_kind
    kind, query = connection_kind(dom.connect())  # type: ignore[attr-defined]
    name = dom.name()  # type: ignore[attr-defined]
    if kind == "system":
        return f"/run/libvirt/qemu/{name}.pid"
    if kind == "embed":
        return os.path.join(query.get("root", ""), "run", "qemu", f"{name}.pid")
    if kind == "session":
        return f"/run/user/{os.getuid()}/libvirt/qemu/run/{name}.pid"
    raise ChannelError(f"cannot find the QEMU process of a {kind!r} connection")


def domain_qemu_pid(dom: object) -> int:
    return qemu_pid(_pid_file(dom), dom.UUIDString())  # type: ignore[attr-defined]


def check_migration(dom: object, what: str) -> None:
    """Raises if QEMU's migration failed (e.g. it could not reach the socket)
    or the process is asked to stop: a reason to stop waiting for channels."""
    from . import watch
    from .virt import qmp
    watch.check_abort()
    info = qmp(dom, "query-migrate") or {}  # type: ignore[arg-type]
    if info.get("status") in ("failed", "cancelled"):
        raise ChannelError(f"QEMU {what} {info['status']}: "
                           f"{info.get('error-desc', 'no reason given')}")


def destroy_if_engine_fails(dom: object, worker: object) -> threading.Thread:
    """Watches a multi-channel restore's engine; if it fails, destroys the
    QEMU it was feeding. QEMU 7.2's incoming multifd can hang its main loop
    when a channel breaks (seen: a corrupt image, the engine stopped
    mid-stream), and libvirt then waits for its monitor without end; the
    destroy ends such waits (libvirt kills the process before it takes the
    domain's job). The restore fails and destroys that QEMU in any case."""
    def watch() -> None:
        try:
            worker.result()  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - any failure of the engine
            with contextlib.suppress(Exception):
                if dom.isActive():  # type: ignore[attr-defined]
                    dom.destroy()  # type: ignore[attr-defined]
    t = threading.Thread(target=watch, name="fastsave-channel-guard", daemon=True)
    t.start()
    return t


def qmp_call(dom: object) -> QmpCall:
    from .virt import qmp
    return lambda command, arguments=None: qmp(dom, command, arguments)  # type: ignore[arg-type]


class SaveChannels:
    """A save over main + `multifd` channels: `start()` turns multifd on and
    has QEMU migrate to a private socket; `accept()` returns the channel fds
    [main, id 0, ...], owned by the caller; `close()` removes the socket and
    its directory (and is safe to call at any point)."""

    def __init__(self, dom: object, multifd: int) -> None:
        self.dom, self.multifd = dom, multifd
        self.changed: dict[str, bool] = {}
        self.refused: list[int] = []
        self.pid = domain_qemu_pid(dom)
        self.dir = SocketDir(self.pid)
        try:
            self.listener = listen(self.dir.socket, multifd + 2)
            os.chown(self.dir.socket, self.dir.uid, self.dir.gid)  # QEMU's user may connect
        except BaseException:
            self.dir.close()
            raise

    def start(self) -> None:
        qmp = qmp_call(self.dom)
        self.changed = pin_stream(qmp, self.multifd)
        qmp("migrate", {"uri": f"unix:{self.dir.socket}"})

    def accept(self, check: Callable[[], None] | None = None,
               timeout: float = ACCEPT_TIMEOUT) -> list[int]:
        """Once QEMU's channels are in (or this failed) the socket is gone:
        a late connection finds nobody listening."""
        try:
            socks = accept_channels(self.listener, self.pid, self.multifd, timeout=timeout,
                                    check=check, refused=self.refused)
        finally:
            self.close()
        if self.refused:
            log.warning("refused migration connections from processes %s (not the domain's "
                        "QEMU, %d)", self.refused, self.pid)
        return [s.detach() for s in socks]

    def close(self) -> None:
        self.listener.close()
        self.dir.close()


class RestoreChannels:
    """A restore over main + `multifd` channels into a QEMU started with
    `-incoming defer`: `start()` turns multifd on and has QEMU listen on a
    private socket; `connect()` returns the channel fds [main, id 0, ...]
    in the order QEMU must see them, owned by the caller."""

    def __init__(self, dom: object, multifd: int) -> None:
        self.dom, self.multifd = dom, multifd
        self.changed: dict[str, bool] = {}
        self.pid = domain_qemu_pid(dom)
        self.dir = SocketDir(self.pid)

    def start(self) -> None:
        qmp = qmp_call(self.dom)
        self.changed = pin_stream(qmp, self.multifd)
        qmp("migrate-incoming", {"uri": f"unix:{self.dir.socket}"})

    def connect(self, timeout: float = ACCEPT_TIMEOUT) -> list[int]:
        return [s.detach() for s in connect_channels(self.dir.socket, self.pid, self.multifd,
                                                     timeout=timeout)]

    def close(self) -> None:
        self.dir.close()
