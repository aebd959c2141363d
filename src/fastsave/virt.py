"""libvirt glue: errors with libvirt's codes, flag checks, connection checks,
and passing QMP commands (with file descriptors) to a domain's QEMU."""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

import libvirt
import libvirt_qemu

__all__ = ["VirtError", "fail", "check_domain", "check_flags", "check_qemu_local",
           "check_writable", "is_readonly", "qmp", "connection_kind"]


class VirtError(libvirt.libvirtError):
    """A libvirt error raised by fastsave itself: existing code that catches
    libvirt.libvirtError and reads get_error_code() works unchanged."""

    def __init__(self, code: int, message: str, domain: int = libvirt.VIR_FROM_QEMU) -> None:
        Exception.__init__(self, message)
        self.err = (code, domain, message, libvirt.VIR_ERR_ERROR, None, None, None, -1, -1)


def fail(code: int, message: str, domain: int = libvirt.VIR_FROM_QEMU) -> VirtError:
    return VirtError(code, message, domain)


def check_domain(dom: object, func: str) -> libvirt.virDomain:
    if not isinstance(dom, libvirt.virDomain) or getattr(dom, "_conn", None) is None:
        raise fail(libvirt.VIR_ERR_INVALID_DOMAIN, f"invalid domain pointer in {func}",
                   libvirt.VIR_FROM_DOMAIN)
    return dom


def check_flags(flags: int, allowed: int, func: str) -> None:
    if not isinstance(flags, int) or flags < 0 or flags & ~allowed:
        raise fail(libvirt.VIR_ERR_INVALID_ARG,
                   f"unsupported flags (0x{flags & ~allowed if isinstance(flags, int) else 0:x}) "
                   f"in function {func}", libvirt.VIR_FROM_DOMAIN)


def connection_kind(conn: libvirt.virConnect) -> tuple[str, dict[str, str]]:
    """('system' | 'session' | 'embed', query) for a local QEMU connection."""
    u = urllib.parse.urlsplit(conn.getURI())
    query = dict(urllib.parse.parse_qsl(u.query))
    path = u.path.rstrip("/") or "/"
    return {"/system": "system", "/session": "session", "/embed": "embed"}.get(path, path), query


def check_qemu_local(dom: libvirt.virDomain, func: str) -> None:
    """fastsave needs the QEMU driver, on this host (fds are passed to QEMU)."""
    conn = dom.connect()
    try:
        kind = conn.getType()
    except libvirt.libvirtError:
        kind = ""
    u = urllib.parse.urlsplit(conn.getURI())
    scheme = u.scheme.split("+")
    remote = bool(u.hostname) or (len(scheme) > 1 and scheme[1] not in ("unix",))
    if kind != "QEMU" or scheme[0] != "qemu" or remote:
        raise fail(libvirt.VIR_ERR_NO_SUPPORT,
                   f"this function is not supported by the connection driver: {func} "
                   f"(fastsave needs a local QEMU connection, got {conn.getURI()})")


def is_readonly(dom: libvirt.virDomain) -> bool:
    """libvirt does not expose a connection's read-only flag; setting the
    autostart flag to its current value is refused on a read-only connection
    and changes nothing on a writable one."""
    try:
        dom.setAutostart(dom.autostart())
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_OPERATION_DENIED:
            return True
        if e.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_INVALID_DOMAIN):
            raise
    return False


def check_writable(dom: libvirt.virDomain, func: str) -> None:
    if is_readonly(dom):
        raise fail(libvirt.VIR_ERR_OPERATION_DENIED,
                   f"operation forbidden: read only access prevents {func}",
                   libvirt.VIR_FROM_DOMAIN)


def qmp(dom: libvirt.virDomain, command: str, arguments: dict[str, Any] | None = None,
        fds: list[int] | None = None) -> Any:
    """Runs one QMP command in the domain's QEMU; returns its `return` value."""
    msg: dict[str, Any] = {"execute": command}
    if arguments:
        msg["arguments"] = arguments
    text = json.dumps(msg)
    if fds:
        reply, _ = libvirt_qemu.qemuMonitorCommandWithFiles(dom, text, fds, 0)
    else:
        reply = libvirt_qemu.qemuMonitorCommand(dom, text, 0)
    data = json.loads(reply)
    if "error" in data:
        err = data["error"]
        raise fail(libvirt.VIR_ERR_OPERATION_FAILED,
                   f"QEMU refused {command}: {err.get('desc', err)}")
    return data.get("return")
