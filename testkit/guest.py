"""The test guest: a tiny multiboot kernel (tests/guest/) built with the system
gcc, run under TCG by libvirt, with helpers to read its state from outside."""
from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import tempfile
import uuid as _uuid
from dataclasses import dataclass
from pathlib import Path

import libvirt
import libvirt_qemu

import fastsave
from fastsave.virt import qmp

GUEST_SRC = Path(__file__).resolve().parent.parent / "tests" / "guest"
STATE_ADDR = 0x200000
STATE_MAGIC = 0x46535447
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


def build_kernel(out_dir: str | os.PathLike[str]) -> str:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    flags = ["-m32", "-ffreestanding", "-fno-pie", "-fno-stack-protector", "-nostdlib", "-O2"]
    for src in ("start.S", "guest.c"):
        subprocess.run(["gcc", *flags, "-c", str(GUEST_SRC / src), "-o", str(out / (src + ".o"))],
                       check=True)
    kernel = out / "guest.elf"
    subprocess.run(["ld", "-m", "elf_i386", "--no-warn-rwx-segments", "-T", str(GUEST_SRC / "link.ld"),
                    "-o", str(kernel), str(out / "start.S.o"), str(out / "guest.c.o")], check=True)
    return str(kernel)


def domain_xml(name: str, kernel: str, mem_mib: int = 128, *, dom_uuid: str | None = None,
               fill: str | None = None, fill_addr: int = 0x1000000) -> str:
    """A TCG domain booting the test kernel; `fill` loads a file into guest RAM
    from the host side (fast) so the saved state has realistic volume."""
    extra = ""
    if fill:
        extra = (f"<qemu:commandline xmlns:qemu='{QEMU_NS}'><qemu:arg value='-device'/>"
                 f"<qemu:arg value='loader,file={fill},addr=0x{fill_addr:x},force-raw=on'/>"
                 f"</qemu:commandline>")
    return f"""<domain type='qemu' xmlns:qemu='{QEMU_NS}'>
  <name>{name}</name>
  <uuid>{dom_uuid or _uuid.uuid4()}</uuid>
  <memory unit='MiB'>{mem_mib}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{kernel}</kernel></os>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator><memballoon model='none'/></devices>
  {extra}
</domain>"""


def _pmem(dom: libvirt.virDomain, addr: int, size: int) -> bytes:
    fd, path = tempfile.mkstemp(prefix="pmem-")
    os.close(fd)
    try:
        qmp(dom, "pmemsave", {"val": addr, "size": size, "filename": path})
        return Path(path).read_bytes()
    finally:
        os.unlink(path)


@dataclass(frozen=True)
class GuestState:
    boot_id: int
    counter: int


def read_state(dom: libvirt.virDomain) -> GuestState:
    magic, bid_lo, bid_hi, c_lo, c_hi, *_ = struct.unpack("<8I", _pmem(dom, STATE_ADDR, 32))
    assert magic == STATE_MAGIC, "the test guest has not booted"
    return GuestState(boot_id=bid_hi << 32 | bid_lo, counter=c_hi << 32 | c_lo)


def ram_sha256(dom: libvirt.virDomain, mem_mib: int) -> str:
    """sha256 of all guest RAM (call while paused)."""
    fd, path = tempfile.mkstemp(prefix="ram-")
    os.close(fd)
    try:
        qmp(dom, "pmemsave", {"val": 0, "size": mem_mib << 20, "filename": path})
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
        return h.hexdigest()
    finally:
        os.unlink(path)


def registers(dom: libvirt.virDomain) -> str:
    """vCPU registers as QEMU prints them (call while paused)."""
    return libvirt_qemu.qemuMonitorCommand(dom, "info registers", libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)


def wait_booted(dom: libvirt.virDomain, timeout: float = 30) -> GuestState:
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            st = read_state(dom)
            if st.counter > 0:
                return st
        except AssertionError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("the test guest did not start counting")
        time.sleep(0.05)


def discard(dom: libvirt.virDomain) -> None:
    """Stops the domain and removes it with any saved state, libvirt's or fastsave's."""
    if dom.isActive():
        dom.destroy()
    if dom.isPersistent():
        fastsave.managed_save_remove(dom)
        if dom.hasManagedSaveImage(0):
            dom.managedSaveRemove(0)
        dom.undefine()
