"""The test guests: sizes, their guest-like fill (loaded into RAM by QEMU's
loader device at the first boot only) and their domain XML."""
from __future__ import annotations

import dataclasses
import re
import uuid as uuidlib
from pathlib import Path

from . import GIB, MIB, WORK

SEED = 1


@dataclasses.dataclass(frozen=True)
class Guest:
    key: str
    mem_mib: int
    fill_mib: int
    rounds_full: int

    @property
    def name(self) -> str:
        return f"bench-{self.key}"

    @property
    def label(self) -> str:
        what = f"{self.fill_mib} MiB guest-like data" if self.fill_mib else "no fill (mostly idle)"
        return f"{self.mem_mib / 1024:g} GiB RAM, {what}"


GUESTS = {
    "mixed-512": Guest("mixed-512", 512, 384, 1),
    "mixed-1536": Guest("mixed-1536", 1536, 1024, 3),
    "idle-1536": Guest("idle-1536", 1536, 0, 1),
    "mixed-4096": Guest("mixed-4096", 4096, 3072, 1),
}
MAIN_GUEST = "mixed-1536"
QUICK_GUESTS = ["mixed-512", "mixed-1536"]
FULL_GUESTS = ["mixed-512", "mixed-1536", "idle-1536", "mixed-4096"]


def fill_parts(g: Guest) -> list[tuple[Path, int]]:
    """(file, MiB) pieces of the guest's fill: whole GiB are shared between
    guests (1 GiB parts of one deterministic stream), a smaller fill is that
    stream's prefix. QEMU's loader reads a file with one read(), so no part
    may reach 2 GiB."""
    fill = WORK / "fill"
    if not g.fill_mib:
        return []
    if g.fill_mib % 1024 == 0:
        return [(fill / f"mixed-seed{SEED}-part{i}-1024MiB.bin", 1024)
                for i in range(g.fill_mib // 1024)]
    assert g.fill_mib < 1024
    return [(fill / f"mixed-seed{SEED}-{g.fill_mib}MiB.bin", g.fill_mib)]


def fill_addresses(g: Guest, sizes: list[int]) -> list[int]:
    """Guest-physical addresses (MiB) for the parts: from 16 MiB up in low
    RAM, then from 4 GiB (a pc machine with >= 3.5 GiB keeps 3 GiB low)."""
    low_top = g.mem_mib if g.mem_mib < 3584 else 3072
    high_end = 4096 + (g.mem_mib - low_top)
    addr, out = 16, []
    for s in sizes:
        if addr + s > low_top and addr < 4096:
            addr = 4096
        out.append(addr)
        addr += s
    if addr > (high_end if addr > 4096 else low_top):
        raise ValueError(f"{g.key}: the fill does not fit in guest RAM")
    return out


def write_fills(guests: list[Guest]) -> None:
    from testkit.mixed import mixed_chunks, write_mixed_file

    (WORK / "fill").mkdir(parents=True, exist_ok=True)
    for g in guests:
        parts = fill_parts(g)
        if all(p.exists() and p.stat().st_size == n * MIB for p, n in parts):
            continue
        print(f"   writing {g.fill_mib} MiB of guest-like fill for {g.key}", flush=True)
        if len(parts) == 1 and parts[0][1] < 1024:
            tmp = parts[0][0].with_suffix(".tmp")
            write_mixed_file(tmp, parts[0][1] * MIB, seed=SEED)
            tmp.rename(parts[0][0])
            continue
        chunks = mixed_chunks(len(parts) * GIB, seed=SEED, piece=8 * MIB)
        for path, n in parts:
            tmp = path.with_suffix(".tmp")
            with open(tmp, "wb") as f:
                left = n * MIB
                while left:
                    c = next(chunks)
                    f.write(c)
                    left -= len(c)
            if path.exists() and path.stat().st_size == n * MIB:
                tmp.unlink()
            else:
                tmp.rename(path)


def guest_xml(g: Guest, kernel: str, *, name: str | None = None, dom_uuid: str | None = None) -> str:
    from testkit import guest

    parts = fill_parts(g)
    addrs = fill_addresses(g, [n for _, n in parts])
    name = name or g.name
    dom_uuid = dom_uuid or str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"fastsave-compare/{name}"))
    xml = guest.domain_xml(name, kernel, g.mem_mib, dom_uuid=dom_uuid,
                           fill=str(parts[0][0]) if parts else None,
                           fill_addr=(addrs[0] * MIB) if parts else 0x1000000)
    extra = "".join(f"<qemu:arg value='-device'/>"
                    f"<qemu:arg value='loader,file={p},addr=0x{a * MIB:x},force-raw=on'/>"
                    for (p, _), a in zip(parts[1:], addrs[1:]))
    return xml.replace("</qemu:commandline>", extra + "</qemu:commandline>") if extra else xml


def without_fill(xml: str) -> str:
    """The domain XML without the loader devices that fill its RAM. The fill
    is loaded once, at the guest's first boot (see Agent.op_prime); guests
    then run and are saved and restored from this XML, so no start pays for
    reading the fill files again (a real guest has no such device)."""
    return re.sub(r"<qemu:commandline[^>]*>.*?</qemu:commandline>", "", xml, flags=re.S)


def with_incoming(xml: str) -> str:
    """The XML with `-incoming defer` added, as fastsave's restore builds it."""
    args = "<qemu:arg value='-incoming'/><qemu:arg value='defer'/>"
    if "</qemu:commandline>" in xml:
        return xml.replace("</qemu:commandline>", args + "</qemu:commandline>")
    qns = "http://libvirt.org/schemas/domain/qemu/1.0"
    return xml.replace("</domain>", f"<qemu:commandline xmlns:qemu='{qns}'>{args}"
                                    f"</qemu:commandline></domain>")
