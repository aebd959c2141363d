"""Opening libvirt connections the way fastsave needs them."""

from __future__ import annotations

import os
import threading
import urllib.parse

import libvirt

__all__ = ["open_connection", "prepare_embed_root", "embed_uri"]

# The embedded driver runs QEMU itself: without these it would drop QEMU to
# the libvirt-qemu user, which cannot open /dev/kvm; and "file" logging needs
# no virtlogd daemon.
EMBED_QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
security_driver = "none"
remember_owner = 0
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
"""

_loop_lock = threading.Lock()
_loop_started = False


def embed_uri(root: str | os.PathLike[str]) -> str:
    return "qemu:///embed?root=" + urllib.parse.quote(os.path.abspath(os.fspath(root)), safe="/")


def prepare_embed_root(root: str | os.PathLike[str], qemu_conf: str | None = None) -> str:
    """Creates an embedded driver root with a working qemu.conf; returns its URI."""
    etc = os.path.join(os.fspath(root), "etc")
    os.makedirs(etc, mode=0o700, exist_ok=True)
    conf = os.path.join(etc, "qemu.conf")
    if qemu_conf is not None or not os.path.exists(conf):
        with open(conf, "w", encoding="utf-8") as f:
            f.write(qemu_conf if qemu_conf is not None else EMBED_QEMU_CONF)
    return embed_uri(root)


def _ensure_event_loop() -> None:
    """The embedded driver needs an event loop running in this process."""
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _loop_started = True


def open_connection(uri: str, readonly: bool = False) -> libvirt.virConnect:
    if urllib.parse.urlsplit(uri).path.rstrip("/") == "/embed":
        _ensure_event_loop()
    return libvirt.openReadOnly(uri) if readonly else libvirt.open(uri)
