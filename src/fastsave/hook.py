"""The libvirt QEMU hook that stops a plain libvirt start from booting a
domain fresh while fastsave holds its saved state, and checks a saved state
fastsave made visible to libvirt before libvirt restores it.

libvirtd runs every executable in /etc/libvirt/hooks/qemu.d/ before it starts
a domain ("prepare begin"), with the domain XML on stdin; a non-zero exit
refuses the start and libvirt shows the hook's message. This covers `virsh
start`, other management tools and libvirtd's autostart alike. fastsave's own
restore carries a one-time token in the domain metadata and passes.

What it covers: domains of the system daemon (qemu:///system), whose images
live in the stores of the configuration file (config.CONFIG_PATH), read at
every run: the system store /var/lib/fastsave/images and every `store =`
line. Saves on qemu:///system refuse other stores while the hook is
installed (store.require_guarded). Embedded drivers (qemu:///embed?root=ROOT)
run no hooks: their domains can only be started by the one process that has
the root open, and their images (ROOT/fastsave/images) are that process's
business. Session daemons are not covered either.

It fails closed when it cannot know: a configuration file that cannot be
read or parsed, or a store that is missing or not mounted (no marker file,
config.STORE_MARKER, which fastsave writes into every store it creates),
refuses every start with a message saying what to fix; XML without a
readable UUID refuses the start only while some store holds an image. A
missing configuration file means the system store alone. A host with fastsave
installed but nothing saved starts its domains as usual.

Images published at libvirt's managed-save path (published.py; the store
keeps a `.UUID.published` record of the link) are libvirt's to restore: for
their domains the hook runs fastsave itself (`published.hook_main`, in a
`python -I` child that loads the installed package by its directory) at
`prepare begin`, which verifies every chunk and the binding to the persistent
definition before libvirt reads the image, sets a bad image aside and refuses
the start, removes fastsave's copy when libvirt's link is gone (force-boot,
managedsave-remove), and at `started begin`, where the store lets go of an
image libvirt restored. Failing to run that check refuses the start.

The script itself uses the standard library only and never imports fastsave;
neither it nor its child calls libvirt (libvirtd waits for the hook).
`fastsave install-hook` writes it from the same constants and the same
configuration parser the library uses.
"""

from __future__ import annotations

import os
import sys

from .config import CONFIG_PATH, HOOK_DIR, HOOK_NAME, STORE_MARKER, SYSTEM_DIR, parser_source

__all__ = ["HOOK_DIR", "HOOK_NAME", "hook_script", "install_hook", "store_problems",
           "definitions_dir"]

_TEMPLATE = r'''#!@PYTHON@
# Installed by fastsave (fastsave install-hook), which rewrites it: do not edit.
# Refuses to start a domain that has a fastsave saved state unless fastsave
# itself is restoring it, or libvirt restores it from its managed-save path
# after fastsave checked it. Image stores: @CONFIG_PATH@, read at every start.
from __future__ import annotations

import os
import sys
import uuid as _uuid
import xml.etree.ElementTree as ET

CONFIG = @CONFIG@
SYSTEM_DIR = @SYSTEM_DIR@
MARKER = @MARKER@
IMAGE_SUFFIX = @IMAGE_SUFFIX@
TOKEN_NS = @TOKEN_NS@
PUBLISHED = @PUBLISHED@
DEFINITIONS = @DEFINITIONS@
# fastsave itself, run only for an image it made visible to libvirt (see check()).
FASTSAVE_PYTHON = @FASTSAVE_PYTHON@
FASTSAVE_PACKAGE = @FASTSAVE_PACKAGE@
BOOTSTRAP = @BOOTSTRAP@


@PARSER@

class Refuse(Exception):
    pass


def guarded_stores():
    try:
        text = read_text(CONFIG)
    except ValueError as e:
        raise Refuse("%s; fix it" % e)
    try:
        listed = [] if text is None else parse_text(text)["store"]
    except ValueError as e:
        raise Refuse("%s is not valid: %s; fix it" % (CONFIG, e))
    stores = [SYSTEM_DIR] + [s for s in listed if s != SYSTEM_DIR]
    for store in stores:
        if not os.path.isfile(os.path.join(store, MARKER)):
            how = ("run 'fastsave install-hook' to create it" if store == SYSTEM_DIR else
                   "mount it, or remove its 'store =' line from %s if it is gone for good" % CONFIG)
            raise Refuse("image store %s is missing or not mounted (it has no %s file): %s"
                         % (store, MARKER, how))
    return stores


def images(store):
    return sorted(n for n in os.listdir(store) if n.endswith(IMAGE_SUFFIX) and not n.startswith("."))


def refuse(name, why):
    sys.stderr.write("fastsave: refusing to start domain %s: %s\n" % (name, why))
    return 1


def published(store, uuid):
    return os.path.lexists(os.path.join(store, "." + uuid + "." + PUBLISHED))


def own_restore(root, store, uuid):
    """The XML carries the restore token fastsave issued for this start."""
    tok = root.find("./metadata/{%s}restore" % TOKEN_NS)
    try:
        with open(os.path.join(store, "." + uuid + ".token")) as f:
            expected = f.read().strip()
    except OSError:
        expected = None
    return tok is not None and bool(expected) and tok.get("token") == expected


def check(phase, store, uuid, name):
    """fastsave's own check of an image it linked to libvirt's managed-save
    path (fastsave.published.hook_main): the image's chunks and binding
    before libvirt restores it; letting go of it once libvirt has. Its exit
    code is the answer; it writes its reason to stderr, which libvirt shows."""
    import subprocess
    try:
        r = subprocess.run([FASTSAVE_PYTHON, "-I", "-c", BOOTSTRAP, FASTSAVE_PACKAGE, phase, store,
                            uuid, name, DEFINITIONS], stdin=subprocess.DEVNULL, cwd="/",
                           env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"})
    except OSError as e:
        raise Refuse("fastsave cannot check its saved state (%s)" % e)
    if r.returncode not in (0, 1):
        raise Refuse("fastsave's check of its saved state failed (exit status %d)" % r.returncode)
    return r.returncode


def started(argv, text):
    """libvirt started the domain: if it restored fastsave's published image,
    fastsave's copy goes. Never refuses (the guest runs already)."""
    try:
        stores = guarded_stores()
        root = ET.fromstring(text)
        uuid = str(_uuid.UUID((root.findtext("uuid") or "").strip()))
    except (Refuse, ET.ParseError, ValueError):
        return 0
    for store in stores:
        if published(store, uuid) and not own_restore(root, store, uuid):
            try:
                check("started", store, uuid, argv[1])
            except Refuse:
                pass
    return 0


def main(argv):
    if len(argv) >= 4 and (argv[2], argv[3]) == ("started", "begin"):
        return started(argv, sys.stdin.read())
    if len(argv) < 4 or (argv[2], argv[3]) != ("prepare", "begin"):
        return 0
    name = argv[1]
    text = sys.stdin.read()
    try:
        stores = guarded_stores()
    except Refuse as e:
        return refuse(name, "%s. Until then the hook cannot tell whether the domain has a saved "
                      "state that a plain start would lose." % e)
    try:
        root = ET.fromstring(text)
        uuid = str(_uuid.UUID((root.findtext("uuid") or "").strip()))
    except (ET.ParseError, ValueError) as e:
        saved = [os.path.join(s, n) for s in stores for n in images(s)]
        if not saved:
            return 0
        return refuse(name, "its UUID cannot be read from the domain XML (%s), and saved states "
                      "exist (%s); it may be one of them" % (e, ", ".join(saved)))
    name = (root.findtext("name") or name).strip()
    for store in stores:
        image = os.path.join(store, uuid + IMAGE_SUFFIX)
        if not os.path.lexists(image):
            continue
        if own_restore(root, store, uuid):
            return 0
        if published(store, uuid):  # libvirt may restore it: fastsave checks it first
            try:
                return check("prepare", store, uuid, argv[1])
            except Refuse as e:
                return refuse(name, "%s; the start is refused until it can" % e)
        return refuse(name, "it has a saved state (%s); a plain start would boot it fresh and "
                      "lose it. Restore it with 'fastsave start %s', or discard the saved "
                      "state with 'fastsave remove %s' (or 'fastsave start --force-boot %s')."
                      % (image, name, name, name))
    return 0


if __name__ == "__main__":
    try:
        code = main(sys.argv)
    except Exception as e:  # fail closed
        sys.stderr.write("fastsave: refusing the start: the hook failed (%r)\n" % (e,))
        code = 1
    sys.exit(code)
'''


def definitions_dir(hook_dir: str = HOOK_DIR) -> str:
    """Where libvirt keeps the persistent definitions of the daemon whose
    hooks live in hook_dir (SYSCONFDIR/libvirt/hooks/qemu.d ->
    SYSCONFDIR/libvirt/qemu)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(hook_dir))), "qemu")


def hook_script(config_path: str = CONFIG_PATH, system_dir: str = SYSTEM_DIR,
                hook_dir: str = HOOK_DIR) -> str:
    from .restore_xml import TOKEN_NS
    from .store import IMAGE_SUFFIX, PUBLISHED_KIND
    from .worker import _PACKAGE_DIR, bootstrap
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    values = {
        "@PYTHON@": python,
        "@CONFIG_PATH@": os.path.abspath(config_path),
        "@CONFIG@": repr(os.path.abspath(config_path)),
        "@SYSTEM_DIR@": repr(os.path.abspath(system_dir)),
        "@MARKER@": repr(STORE_MARKER),
        "@IMAGE_SUFFIX@": repr(IMAGE_SUFFIX),
        "@TOKEN_NS@": repr(TOKEN_NS),
        "@PUBLISHED@": repr(PUBLISHED_KIND),
        "@DEFINITIONS@": repr(definitions_dir(hook_dir)),
        "@FASTSAVE_PYTHON@": repr(sys.executable),
        "@FASTSAVE_PACKAGE@": repr(_PACKAGE_DIR),
        "@BOOTSTRAP@": repr(bootstrap("published", "hook_main(sys.argv[2:])")),
        "@PARSER@": parser_source(),
    }
    text = _TEMPLATE
    for k, v in values.items():
        text = text.replace(k, v)
    return text


def store_problems(config_path: str = CONFIG_PATH, system_dir: str = SYSTEM_DIR) -> list[str]:
    """What would make the installed hook refuse every start, one line each."""
    from .config import ConfigError, load
    try:
        cfg = load(config_path)
    except ConfigError as e:
        return [str(e)]
    out = []
    for s in [system_dir, *(x for x in cfg.stores if x != system_dir)]:
        if not os.path.isfile(os.path.join(s, STORE_MARKER)):
            out.append(f"image store {s} is missing or not mounted (no {STORE_MARKER} in it)")
    return out


def install_hook(stores: list[str] | None = None, hook_dir: str = HOOK_DIR, *,
                 config_path: str = CONFIG_PATH, system_dir: str = SYSTEM_DIR) -> str:
    """Lists `stores` in the configuration file (written, with comments, if
    there is none), creates and marks them and the system store, marks the
    listed stores that exist, and writes the hook.
    A listed store that does not exist is not created (it may be a mount that
    is missing): store_problems() reports it. libvirtd notices a new hook
    script when it (re)starts; later changes of the configuration need no
    reinstall. Returns the hook's path."""
    from .config import add_stores
    from .store import ImageStore
    cfg = add_stores(list(stores or ()), config_path)  # also writes a commented file if none
    named = {os.path.abspath(s) for s in stores or ()} | {os.path.abspath(system_dir)}
    for s in [system_dir, *cfg.stores]:
        if os.path.abspath(s) in named or os.path.isdir(s):
            with ImageStore(s) as store:
                store.mark()
    os.makedirs(hook_dir, mode=0o755, exist_ok=True)
    path = os.path.join(hook_dir, HOOK_NAME)
    # Written next to qemu.d, not in it: libvirtd runs whatever is executable there.
    tmp = os.path.join(os.path.dirname(os.path.abspath(hook_dir)), f".{HOOK_NAME}-hook.new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(hook_script(config_path, system_dir, hook_dir))
        f.flush()
        os.fchmod(f.fileno(), 0o755)
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


if __name__ == "__main__":  # pragma: no cover - manual use
    print(hook_script(), end="")
