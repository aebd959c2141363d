"""The libvirt QEMU hook that stops a plain libvirt start from booting a
domain fresh while fastsave holds its saved state.

libvirt runs every executable in /etc/libvirt/hooks/qemu.d/ before it starts
a domain ("prepare begin"), with the domain XML on stdin; a non-zero exit
refuses the start and libvirt shows the hook's message. This covers `virsh
start`, other management tools and libvirtd's autostart alike. fastsave's own
restore carries a one-time token in the domain metadata and passes.
The script uses the standard library only, and must never call libvirt.
"""

from __future__ import annotations

import os
import sys

__all__ = ["HOOK_DIR", "hook_script", "install_hook", "uninstall_hook"]

HOOK_DIR = "/etc/libvirt/hooks/qemu.d"
HOOK_NAME = "fastsave"

_TEMPLATE = r'''#!{python}
# Installed by fastsave (fastsave install-hook). Refuses to start a domain that
# has a fastsave saved state unless fastsave itself is restoring it.
import os, sys, xml.etree.ElementTree as ET

STORES = {stores!r}
TOKEN_NS = "urn:fastsave:restore:1"

def main(argv):
    if len(argv) < 3 or (argv[2], argv[3] if len(argv) > 3 else "") != ("prepare", "begin"):
        return 0
    try:
        root = ET.fromstring(sys.stdin.read())
    except ET.ParseError:
        return 0
    uuid = (root.findtext("uuid") or "").strip().lower()
    name = (root.findtext("name") or argv[1]).strip()
    if not uuid or "/" in uuid or uuid.startswith("."):
        return 0
    for store in STORES:
        image = os.path.join(store, uuid + ".fsimg")
        if not os.path.exists(image):
            continue
        tok = root.find("./metadata/{{%s}}restore" % TOKEN_NS)
        try:
            with open(os.path.join(store, "." + uuid + ".token")) as f:
                expected = f.read().strip()
        except OSError:
            expected = None
        if tok is not None and expected and tok.get("token") == expected:
            return 0
        sys.stderr.write(
            "fastsave: domain %s has a saved state (%s); a plain start would boot it fresh "
            "and lose it. Restore it with 'fastsave start %s', or discard the saved state "
            "with 'fastsave remove %s' (or 'fastsave start --force-boot %s').\n"
            % (name, image, name, name, name))
        return 1
    return 0

sys.exit(main(sys.argv))
'''


def hook_script(stores: list[str]) -> str:
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    return _TEMPLATE.format(python=python, stores=[os.path.abspath(s) for s in stores])


def install_hook(stores: list[str], hook_dir: str = HOOK_DIR) -> str:
    """Writes the hook; libvirtd notices new hook scripts when it (re)starts."""
    os.makedirs(hook_dir, mode=0o755, exist_ok=True)
    path = os.path.join(hook_dir, HOOK_NAME)
    tmp = path + ".new"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(hook_script(stores))
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    return path


def uninstall_hook(hook_dir: str = HOOK_DIR) -> bool:
    try:
        os.unlink(os.path.join(hook_dir, HOOK_NAME))
        return True
    except FileNotFoundError:
        return False


if __name__ == "__main__":  # pragma: no cover - manual use
    print(hook_script(sys.argv[1:] or ["/var/lib/fastsave/images"]), end="")
