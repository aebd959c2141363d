"""fastsave demo on the embedded libvirt driver (no daemon needed).

Boots the test guest with 1.5 GiB of RAM, 1 GiB of it filled with a
guest-like mix (code, text, zeros, noise), then saves and restores it with
libvirt's own managed save and with fastsave, and shows both side by side:
save time, image size, restore time, and whether the guest came back where
it was (same boot, counter going on).

Run from the repository root: `bash demo/run` (installs first), or as root
`.venv/bin/python -m demo.demo`.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import time
from pathlib import Path

import libvirt

import fastsave
from testkit import guest
from testkit.mixed import write_mixed_file

MEM_MIB = 1536
FILL_MIB = 1024
WORK = Path(os.environ.get("FASTSAVE_DEMO_DIR", "/var/tmp/fastsave-demo"))


def timed(fn, *args, **kw) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    fn(*args, **kw)
    return time.perf_counter() - t


def came_back(dom: libvirt.virDomain, before: guest.GuestState) -> str:
    after = guest.wait_booted(dom)
    if after.boot_id != before.boot_id:
        return "NO (it booted fresh)"
    return f"yes (counter {before.counter:,} -> {after.counter:,})"


def main() -> int:
    if WORK.exists():
        shutil.rmtree(WORK)
    (WORK / "root").mkdir(parents=True, mode=0o700)
    print(f"== preparing the guest in {WORK}")
    kernel = guest.build_kernel(WORK / "guest")
    fill = WORK / "fill.bin"
    write_mixed_file(fill, FILL_MIB << 20, seed=1)
    conn = fastsave.open_connection(fastsave.prepare_embed_root(WORK / "root"))
    dom = conn.defineXML(guest.domain_xml("fastsave-demo", kernel, MEM_MIB, fill=str(fill)))
    try:
        dom.create()
        guest.wait_booted(dom)
        rows = []

        print("== libvirt managedSave (its default raw format), then start")
        before = guest.read_state(dom)
        save_s = timed(dom.managedSave, 0)
        image = glob.glob(str(WORK / "root" / "lib" / "qemu" / "save" / "*.save"))
        size = os.path.getsize(image[0]) if image else 0
        restore_s = timed(dom.create)
        rows.append(("libvirt managedSave", save_s, size, restore_s, came_back(dom, before)))

        print("== libvirt managedSave with BYPASS_CACHE, then start")
        before = guest.read_state(dom)
        save_s = timed(dom.managedSave, libvirt.VIR_DOMAIN_SAVE_BYPASS_CACHE)
        image = glob.glob(str(WORK / "root" / "lib" / "qemu" / "save" / "*.save"))
        size = os.path.getsize(image[0]) if image else 0
        restore_s = timed(dom.createWithFlags, libvirt.VIR_DOMAIN_START_BYPASS_CACHE)
        rows.append(("libvirt managedSave --bypass-cache", save_s, size, restore_s,
                     came_back(dom, before)))

        for mode in ("auto", "zstd", "raw"):
            print(f"== fastsave.managed_save (mode {mode}), then fastsave.start")
            before = guest.read_state(dom)
            save_s = timed(fastsave.managed_save, dom, mode=mode)
            path = fastsave.image_store(conn).image_path(dom.UUIDString())
            size = os.path.getsize(path)
            assert fastsave.has_managed_save_image(dom) == 1
            restore_s = timed(fastsave.start, dom)
            assert fastsave.has_managed_save_image(dom) == 0 and not os.path.exists(path)
            rows.append((f"fastsave {mode}", save_s, size, restore_s, came_back(dom, before)))

        base_save, base_size = rows[1][1], rows[0][2] or 1
        print()
        print(f"guest: {MEM_MIB} MiB RAM, {FILL_MIB} MiB of it guest-like data; "
              f"ratios against libvirt --bypass-cache (time) and libvirt raw (size)")
        print(f"| {'method':36} | save s | x time | image MB | x size | restore s | state came back |")
        print(f"|{'-' * 38}|-------:|-------:|---------:|-------:|----------:|-----------------|")
        for name, s, size, r, ok in rows:
            print(f"| {name:36} | {s:6.2f} | {s / base_save:6.2f} | {size / 1e6:8.0f} | "
                  f"{size / base_size:6.2f} | {r:9.2f} | {ok} |")
        return 0 if all(r[4].startswith("yes") for r in rows) else 1
    finally:
        guest.discard(dom)
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
