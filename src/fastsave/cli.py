"""The `fastsave` command: managed save from the shell and from boot scripts.

Exit codes: 0 success; 1 the operation failed; 2 bad usage; 3 some domains
failed (save-all, restore-all, autostart); 4 an image failed verification.
Errors print one line unless --debug is given. The options --uri, --json,
--debug, --readonly and --image-dir may be given before or after the verb.
Domains are named by name, UUID or id, as with virsh.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
from typing import Any

from .config import CONFIG_PATH, SYSTEM_DIR

__all__ = ["main"]

DEFAULT_URI = "qemu:///system"


def _conn(args: argparse.Namespace, readonly: bool = False) -> Any:
    import libvirt

    from .connect import open_connection
    if not args.debug:  # libvirt would print every error itself; ours says it once
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return open_connection(args.uri, readonly=readonly or getattr(args, "readonly", False))


def _domain(conn: Any, ident: str) -> Any:
    """By id (a number), UUID or name, in virsh's order."""
    import libvirt
    lookups = [conn.lookupByUUIDString, conn.lookupByName]
    if ident.isdigit():
        lookups.insert(0, lambda i: conn.lookupByID(int(i)))
    for lookup in lookups:
        try:
            return lookup(ident)
        except (libvirt.libvirtError, OverflowError):
            continue
    from .virt import fail
    raise fail(libvirt.VIR_ERR_NO_DOMAIN, f"Domain not found: {ident}")


def channel_count(text: str) -> int | str:
    """--channels: "auto" or a count from 1."""
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected auto or a number >= 1, not {text!r}")
    return n


def _options(args: argparse.Namespace) -> Any:
    from .managed import Options
    kw: dict[str, Any] = {}
    for name in ("mode", "level", "threads", "image_dir"):
        if getattr(args, name, None) is not None:
            kw[name] = getattr(args, name)
    if getattr(args, "channels", None) not in (None, "auto"):
        kw["channels"] = args.channels
    if getattr(args, "direct", None) is not None:
        kw["direct"] = args.direct
    return Options(**kw)


def _out(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, default=str) if args.json else text)


def cmd_save(args: argparse.Namespace) -> int:
    import libvirt

    from .managed import managed_save
    flags = (libvirt.VIR_DOMAIN_SAVE_BYPASS_CACHE if args.bypass_cache else 0) \
        | (libvirt.VIR_DOMAIN_SAVE_RUNNING if args.running else 0) \
        | (libvirt.VIR_DOMAIN_SAVE_PAUSED if args.paused else 0)
    conn = _conn(args)
    for ident in args.domain:
        dom = _domain(conn, ident)
        if args.verbose:
            from .progress import JobProgress
            with JobProgress("Managed save", _save_percent(dom)):
                managed_save(dom, flags, options=_options(args))
        else:
            managed_save(dom, flags, options=_options(args))
        _out(args, {"domain": ident, "saved": True}, f"Domain '{ident}' state saved by fastsave")
    return 0


def _save_percent(dom: Any) -> Any:
    """How far QEMU's migration into the image is, as virsh computes it from
    the job's remaining and total RAM."""
    from .virt import qmp

    def percent() -> float | None:
        ram = (qmp(dom, "query-migrate") or {}).get("ram") or {}
        total, remaining = ram.get("total"), ram.get("remaining")
        if not total or remaining is None:
            return None
        return (1.0 - remaining / total) * 100
    return percent


def cmd_start(args: argparse.Namespace) -> int:
    import libvirt

    from .managed import start
    flags = (libvirt.VIR_DOMAIN_START_PAUSED if args.paused else 0) \
        | (libvirt.VIR_DOMAIN_START_FORCE_BOOT if args.force_boot else 0) \
        | (libvirt.VIR_DOMAIN_START_BYPASS_CACHE if args.bypass_cache else 0)
    conn = _conn(args)
    for ident in args.domain:
        start(_domain(conn, ident), flags, options=_options(args))
        _out(args, {"domain": ident, "started": True}, f"Domain '{ident}' started")
    return 0


def cmd_has(args: argparse.Namespace) -> int:
    from .managed import has_managed_save_image
    conn = _conn(args, readonly=True)
    n = has_managed_save_image(_domain(conn, args.domain), options=_options(args))
    _out(args, {"domain": args.domain, "image": bool(n)}, str(n))
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    from .managed import managed_save_remove
    conn = _conn(args)
    for ident in args.domain:
        managed_save_remove(_domain(conn, ident), options=_options(args))
        _out(args, {"domain": ident, "removed": True}, f"Removed saved state of domain '{ident}'")
    return 0


def _bulk_out(args: argparse.Namespace, report: Any) -> int:
    for w in report.warnings:
        print(f"fastsave: warning: {w}", file=sys.stderr)
    if args.json:
        print(json.dumps({
            "ok": report.ok, "seconds": round(report.seconds, 3), "bytes": report.total_bytes,
            "mb_per_s": round(report.mb_per_s, 1), "warnings": report.warnings,
            "domains": [{"name": r.name, "uuid": r.uuid, "ok": r.ok, "action": r.action,
                         "error": r.error, "seconds": round(r.seconds, 3), "bytes": r.bytes,
                         "image_bytes": r.image_bytes} for r in report.results]}))
    else:
        n_ok = sum(r.ok for r in report.results)
        print(f"{n_ok}/{len(report.results)} domains ok in {report.seconds:.1f} s, "
              f"{report.total_bytes / 1e6:,.0f} MB at {report.mb_per_s:,.0f} MB/s")
    return 0 if report.ok else 3


def _bulk(args: argparse.Namespace, verb: str, run: Any) -> int:
    from .progress import ProgressView
    view = None if args.json else ProgressView(verb)
    try:
        report = run(on_start=view.start if view else None)
    finally:
        if view is not None:
            view.stop()
    return _bulk_out(args, report)


def _host_settings(args: argparse.Namespace) -> Any:
    """--settings FILE (the systemd unit's /etc/default/fastsave): its values
    fill what the command line leaves unset; None without --settings."""
    from .config import load_host_settings
    if not getattr(args, "settings", None):
        return None
    hs, warnings = load_host_settings(args.settings)
    for w in warnings:
        print(f"fastsave: warning: {w}", file=sys.stderr)
    if hs.uri and args.uri in (None, os.environ.get("FASTSAVE_URI", DEFAULT_URI)):
        args.uri = hs.uri
    for name in ("mode", "level", "threads", "image_dir", "parallel", "channels"):
        if getattr(args, name, None) is None and getattr(hs, name) is not None:
            setattr(args, name, getattr(hs, name))
    if getattr(args, "direct", None) is None and hs.bypass_cache:
        args.direct = True
    return hs


def _pick(flag: Any, hs: Any, field: str, default: Any) -> Any:
    """A command-line value, else the settings file's, else `default`."""
    if flag is not None:
        return flag
    return getattr(hs, field) if hs is not None else default


def cmd_save_all(args: argparse.Namespace) -> int:
    from .hostwide import save_all
    hs = _host_settings(args)
    on_shutdown = _pick(args.on_shutdown, hs, "on_shutdown", "save")
    timeout = _pick(args.timeout, hs, "shutdown_timeout", None)
    on_timeout = _pick(args.on_timeout, hs, "on_timeout", None)
    conn = _conn(args)
    return _bulk(args, "save" if on_shutdown == "save" else "shutdown", lambda on_start: save_all(
        conn, names=args.domain or None, match=args.match, parallel=args.parallel,
        timeout=timeout or None, on_timeout=on_timeout, on_shutdown=on_shutdown,
        record=args.record, options=_options(args), on_start=on_start))


def cmd_restore_all(args: argparse.Namespace) -> int:
    from .hostwide import restore_all
    hs = _host_settings(args)
    on_boot = _pick(getattr(args, "on_boot", None), hs, "on_boot", "start")
    start_delay = _pick(getattr(args, "start_delay", None), hs, "start_delay", 0.0)
    conn = _conn(args)
    return _bulk(args, "restore", lambda on_start: restore_all(
        conn, include_all=args.all, names=args.domain or None, match=args.match,
        parallel=args.parallel, options=_options(args), on_start=on_start,
        boot=getattr(args, "boot", False), on_boot=on_boot, start_delay=start_delay))


def cmd_autostart(args: argparse.Namespace) -> int:
    args.domain, args.match = [], None
    return cmd_restore_all(args)


def _image_rows(conn: Any, image_dir: str | None) -> list[dict[str, Any]]:
    """Every image in the store, checked (header to trailer), bad ones with their error."""
    import time as _time

    from . import engine
    from .managed import image_store
    with image_store(conn, image_dir) as store:
        images = store.list_images()
    rows = []
    for uuid, path in images:
        try:
            info = engine.inspect(path)
            row = {"name": info.name, "uuid": uuid, "bytes": info.file_size,
                   "age_s": round(_time.time() - info.created.timestamp()),
                   "codec": info.codec, "was_running": info.was_running, "ok": True}
        except Exception as e:  # noqa: BLE001 - a bad image is listed with its error
            row = {"name": "?", "uuid": uuid, "bytes": os.path.getsize(path), "age_s": None,
                   "codec": None, "was_running": None, "ok": False, "error": str(e)}
        rows.append(row)
    return rows


# virsh's names of libvirt's domain states
_STATES = {0: "no state", 1: "running", 2: "idle", 3: "paused", 4: "in shutdown",
           5: "shut off", 6: "crashed", 7: "pmsuspended"}


def cmd_list(args: argparse.Namespace) -> int:
    """virsh list: running domains by default; "saved" for a shut-off domain
    with a saved state (fastsave's, or libvirt's own)."""
    if args.images:
        return _list_images(args)
    import libvirt

    from .managed import has_managed_save_image
    conn = _conn(args, readonly=True)
    images = {r["uuid"]: r for r in _image_rows(conn, args.image_dir)}
    rows = []
    for dom in conn.listAllDomains(0):
        active = dom.isActive()
        if not (args.all or (args.inactive and not active) or (not args.inactive and active)):
            continue
        saved = False
        if not active:
            saved = bool(has_managed_save_image(dom, options=_options(args))) \
                or bool(dom.hasManagedSaveImage(0))
        if (args.with_managed_save and not saved) or (args.without_managed_save and saved):
            continue
        state = dom.state()[0]
        row = {"id": dom.ID() if active else None, "name": dom.name(), "uuid": dom.UUIDString(),
               "state": "saved" if saved and state == libvirt.VIR_DOMAIN_SHUTOFF
               else _STATES.get(state, "unknown"), "managed_save": saved}
        image = images.get(row["uuid"])
        if saved and image is not None:
            row["image"] = {k: v for k, v in image.items() if k not in ("name", "uuid")}
        rows.append(row)
    rows.sort(key=lambda r: (r["id"] is None, r["id"] or 0, r["name"]))
    if args.json:
        print(json.dumps(rows))
    elif (args.name or args.uuid) and not args.table:
        for r in rows:
            print(" ".join(r[k] for k, want in (("uuid", args.uuid), ("name", args.name)) if want))
    else:
        print(f" {'Id':<4} {'Name':<31} State")
        print("-" * 48)
        for r in rows:
            ident = "-" if r["id"] is None else str(r["id"])
            print(f" {ident:<4} {r['name']:<31} {r['state']}")
        print()
    return 0


def _list_images(args: argparse.Namespace) -> int:
    """The images in the store, with sizes and ages (list --images)."""
    rows = _image_rows(_conn(args, readonly=True), args.image_dir)
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'name':24} {'uuid':36} {'size MB':>9} {'age':>8} {'codec':5} was_running")
    for r in rows:
        age = "-" if r["age_s"] is None else f"{r['age_s'] // 60}m{r['age_s'] % 60:02d}s"
        print(f"{r['name'][:24]:24} {r['uuid']:36} {r['bytes'] / 1e6:9.1f} {age:>8} "
              f"{r['codec'] or '-':5} {r['was_running'] if r['ok'] else 'BAD: ' + r['error']}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from . import engine
    from .errors import ImageError
    path = args.target
    if not os.path.exists(path):
        from .managed import image_store
        conn = _conn(args, readonly=True)
        with image_store(conn, args.image_dir) as store:
            path = store.image_path(_domain(conn, args.target).UUIDString())
    try:
        report = engine.verify(path)
    except ImageError as e:
        _out(args, {"image": path, "ok": False, "error": str(e)}, f"BAD: {e}")
        return 4
    _out(args, {"image": path, "ok": True, "stream_bytes": report.info.stream_length},
         f"OK: {path} ({report.info.stream_length:,} stream bytes, {report.info.chunk_count} chunks)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from . import engine
    info = engine.verify(args.image).info if args.verify else engine.inspect(args.image)
    data = dataclasses.asdict(info)
    if args.xml:
        print(info.xml)
    elif args.json:
        print(json.dumps(data, default=str))
    else:
        for k, v in data.items():
            if k != "xml":
                print(f"{k:18} {v}")
    return 0


def _state_flags(args: argparse.Namespace) -> int:
    import libvirt
    return (libvirt.VIR_DOMAIN_SAVE_RUNNING if args.running else 0) \
        | (libvirt.VIR_DOMAIN_SAVE_PAUSED if args.paused else 0)


def cmd_dumpxml(args: argparse.Namespace) -> int:
    """virsh managedsave-dumpxml."""
    import libvirt

    from .managed import managed_save_get_xml_desc
    conn = _conn(args, readonly=not args.security_info)
    flags = libvirt.VIR_DOMAIN_SAVE_IMAGE_XML_SECURE if args.security_info else 0
    xml = managed_save_get_xml_desc(_domain(conn, args.domain), flags, options=_options(args))
    _out(args, {"domain": args.domain, "xml": xml}, xml.rstrip("\n"))
    return 0


def cmd_define(args: argparse.Namespace) -> int:
    """virsh managedsave-define."""
    from .managed import managed_save_define_xml
    with open(args.file, encoding="utf-8") as f:
        xml = f.read()
    conn = _conn(args)
    managed_save_define_xml(_domain(conn, args.domain), xml, _state_flags(args),
                            options=_options(args))
    _out(args, {"domain": args.domain, "defined": True},
         f"Managed save state file of domain '{args.domain}' updated.")
    return 0


def _editor() -> list[str]:
    """The caller's $VISUAL or $EDITOR (else vi), as virsh picks it: the
    editor runs as the caller, on a private copy of the saved XML."""
    import shlex
    return shlex.split(os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi")


def cmd_edit(args: argparse.Namespace) -> int:
    """virsh managedsave-edit: the secure XML in a private temp dir (0700,
    the file 0600), the caller's editor, define when it changed."""
    import subprocess
    import tempfile

    import libvirt

    from .managed import managed_save_define_xml, managed_save_get_xml_desc
    conn = _conn(args)
    dom = _domain(conn, args.domain)
    opts = _options(args)
    xml = managed_save_get_xml_desc(dom, libvirt.VIR_DOMAIN_SAVE_IMAGE_XML_SECURE, options=opts)
    with tempfile.TemporaryDirectory(prefix="fastsave-edit-") as tmp:  # mkdtemp: mode 0700
        path = os.path.join(tmp, f"{dom.name()}.xml")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(xml)
        r = subprocess.run([*_editor(), path], check=False)
        if r.returncode != 0:
            raise RuntimeError(f"the editor exited with status {r.returncode}; nothing changed")
        with open(path, encoding="utf-8") as f:
            edited = f.read()
    flags = _state_flags(args)
    if edited == xml and not flags:
        _out(args, {"domain": args.domain, "defined": False},
                    f"Managed save image of domain '{dom.name()}' XML configuration not changed.")
        return 0
    managed_save_define_xml(dom, edited, flags, options=opts)
    _out(args, {"domain": args.domain, "defined": True},
         f"Managed save image of Domain '{dom.name()}' XML configuration edited.")
    return 0


def cmd_install_hook(args: argparse.Namespace) -> int:
    from .hook import install_hook, store_problems
    path = install_hook(args.store)
    print(f"installed {path}; it reads the image stores from {CONFIG_PATH} at every domain "
          f"start; restart libvirtd for a new hook to take effect")
    for problem in store_problems():
        print(f"fastsave: warning: {problem}; the hook refuses every start until it is fixed",
              file=sys.stderr)
    return 0


def cmd_install_units(args: argparse.Namespace) -> int:
    from .systemd import UNIT_NAME, install_units, libvirt_guests_enabled
    for path in install_units(args.unit_dir, args.env_file):
        print(f"wrote {path}")
    cmd_install_hook(argparse.Namespace(store=None))
    if libvirt_guests_enabled():
        print(f"fastsave: warning: libvirt-guests.service is enabled; {UNIT_NAME} is ordered to "
              f"save the guests before it at shutdown, so it finds none running, but its ON_BOOT "
              f"and ON_SHUTDOWN no longer apply: 'systemctl disable libvirt-guests.service'",
              file=sys.stderr)
    print(f"then: systemctl daemon-reload && systemctl enable --now {UNIT_NAME}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastsave", description=__doc__.splitlines()[0])
    _global_options(p, os.environ.get("FASTSAVE_URI", DEFAULT_URI))
    sub = p.add_subparsers(dest="cmd", required=True)

    def engine_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--mode", choices=["auto", "zstd", "raw"])
        sp.add_argument("--level", type=int)
        sp.add_argument("--threads", type=int)
        sp.add_argument("--direct", action=argparse.BooleanOptionalAction, default=None)
        sp.add_argument("--channels", type=channel_count, metavar="N|auto",
                        help="saves: migration channels (1: one stream; N > 1: QEMU's multifd; "
                        "auto, the default: from the CPUs); a restore follows its image")

    s = sub.add_parser("save", help="managed-save running domains and stop them")
    s.add_argument("domain", nargs="+")
    s.add_argument("--bypass-cache", action="store_true")
    s.add_argument("--verbose", action="store_true", help="show progress on stderr, as virsh")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--running", action="store_true", help="come back running")
    g.add_argument("--paused", action="store_true", help="come back paused")
    engine_opts(s)
    s.set_defaults(func=cmd_save)

    s = sub.add_parser("start", help="start domains, restoring their saved state")
    s.add_argument("domain", nargs="+")
    s.add_argument("--paused", action="store_true")
    s.add_argument("--force-boot", action="store_true", help="discard the saved state, boot fresh")
    s.add_argument("--bypass-cache", action="store_true")
    engine_opts(s)
    s.set_defaults(func=cmd_start)

    s = sub.add_parser("has", help="print 1 if the domain has a saved state, else 0")
    s.add_argument("domain")
    s.set_defaults(func=cmd_has)

    s = sub.add_parser("remove", help="discard saved states")
    s.add_argument("domain", nargs="+")
    s.set_defaults(func=cmd_remove)

    def bulk_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("domain", nargs="*", help="names or UUIDs (default: all)")
        sp.add_argument("--match", help="shell pattern on domain names")
        sp.add_argument("--parallel", type=int, help="domains at once (default: from core count)")
        engine_opts(sp)

    def settings_opt(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--settings", metavar="FILE",
                        help="read unset options from FILE (KEY=VALUE, as /etc/default/fastsave, "
                        "which the systemd unit passes); flags win")

    s = sub.add_parser("save-all", help="managed-save all running domains concurrently "
                       "(--on-shutdown shutdown: power them off instead)")
    bulk_opts(s)
    s.add_argument("--on-shutdown", choices=["save", "shutdown"],
                   help="save (default) or ask each guest to power off (ACPI), as "
                   "libvirt-guests' ON_SHUTDOWN")
    s.add_argument("--timeout", type=float, help="seconds (SHUTDOWN_TIMEOUT): save: the deadline "
                   "for a save to start; shutdown: the time guests get to power off")
    s.add_argument("--on-timeout", choices=["leave", "shutdown", "destroy", "save"],
                   help="the domains left at the deadline: save mode: leave (default), destroy, "
                   "shutdown (ACPI, up to --timeout more, then destroy); shutdown mode: save "
                   "(default), destroy, leave")
    s.add_argument("--record", action="store_true",
                   help="host shutdown: record the running domains for 'restore-all --boot'")
    settings_opt(s)
    s.set_defaults(func=cmd_save_all)

    s = sub.add_parser("restore-all", help="restore saved domains (autostart ones; --all: all; "
                       "--boot: also those running at the last host shutdown)")
    bulk_opts(s)
    s.add_argument("--all", action="store_true")
    s.add_argument("--boot", action="store_true",
                   help="host boot: start the domains 'save-all --record' found running "
                   "(restored, or booted when they have no saved state), then forget the record")
    s.add_argument("--on-boot", choices=["start", "ignore"],
                   help="ignore: start nothing, keep the saved states (libvirt-guests' ON_BOOT)")
    s.add_argument("--start-delay", type=float, metavar="SECONDS",
                   help="seconds between the beginnings of two starts (START_DELAY)")
    settings_opt(s)
    s.set_defaults(func=cmd_restore_all)

    s = sub.add_parser("autostart", help="host boot: restore autostart domains with a saved state")
    s.add_argument("--all", action="store_true", help="every shut-off domain with a saved state")
    s.add_argument("--parallel", type=int)
    engine_opts(s)
    s.set_defaults(func=cmd_autostart)

    s = sub.add_parser("list", help="domains, as virsh list; state 'saved' for a saved state")
    s.add_argument("--all", action="store_true", help="active and inactive domains")
    s.add_argument("--inactive", action="store_true", help="inactive domains only")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--with-managed-save", action="store_true")
    g.add_argument("--without-managed-save", action="store_true")
    s.add_argument("--name", action="store_true", help="names only")
    s.add_argument("--uuid", action="store_true", help="UUIDs only (with --name: both)")
    s.add_argument("--table", action="store_true", help="the table (the default)")
    s.add_argument("--images", action="store_true",
                   help="the images in the store instead, with sizes, ages and codecs")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("dumpxml", help="the domain XML kept in a saved state "
                       "(virsh managedsave-dumpxml)")
    s.add_argument("domain")
    s.add_argument("--security-info", action="store_true", help="include secrets")
    s.set_defaults(func=cmd_dumpxml)

    def state_opts(sp: argparse.ArgumentParser) -> None:
        g = sp.add_mutually_exclusive_group()
        g.add_argument("--running", action="store_true", help="come back running")
        g.add_argument("--paused", action="store_true", help="come back paused")

    s = sub.add_parser("define", help="replace the domain XML kept in a saved state "
                       "(virsh managedsave-define)")
    s.add_argument("domain")
    s.add_argument("file", help="the new domain XML")
    state_opts(s)
    s.set_defaults(func=cmd_define)

    s = sub.add_parser("edit", help="edit the domain XML kept in a saved state with $VISUAL "
                       "or $EDITOR (virsh managedsave-edit)")
    s.add_argument("domain")
    state_opts(s)
    s.set_defaults(func=cmd_edit)

    s = sub.add_parser("verify", help="check every byte of an image (a path, or a domain's image)")
    s.add_argument("target")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("inspect", help="show an image's metadata (--verify: check all data)")
    s.add_argument("image")
    s.add_argument("--verify", action="store_true")
    s.add_argument("--xml", action="store_true", help="print the domain XML the image was saved with")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("install-hook", help="install the libvirt hook that guards saved states")
    s.add_argument("--store", action="append",
                   help=f"an image store to guard besides {SYSTEM_DIR}: listed in "
                   f"{CONFIG_PATH} and created if missing (repeatable)")
    s.set_defaults(func=cmd_install_hook)
    s = sub.add_parser("install-units", help="install the systemd unit, its settings and the hook")
    s.add_argument("--unit-dir", default="/etc/systemd/system")
    s.add_argument("--env-file", default="/etc/default/fastsave",
                   help="the settings file (written when missing; the unit is sized from it)")
    s.set_defaults(func=cmd_install_units)
    seen: set[int] = set()
    for sp in sub.choices.values():  # every verb, those added later too
        if id(sp) not in seen:
            seen.add(id(sp))
            _global_options(sp, None)
    return p


def _global_options(p: argparse.ArgumentParser, uri_default: str | None) -> None:
    """The options accepted before and after the verb. After it (uri_default
    None) they default to SUPPRESS, so a verb's parser keeps what was given
    before the verb unless it is given again."""
    def dflt(value: Any) -> Any:
        return argparse.SUPPRESS if uri_default is None else value
    p.add_argument("--uri", default=dflt(uri_default),
                   help="libvirt URI (default: $FASTSAVE_URI or qemu:///system)")
    p.add_argument("--json", action="store_true", default=dflt(False), help="machine-readable output")
    p.add_argument("--debug", action="store_true", default=dflt(False), help="show tracebacks")
    p.add_argument("-r", "--readonly", action="store_true", default=dflt(False),
                   help="a read-only libvirt connection")
    p.add_argument("--image-dir", default=dflt(None),
                   help="image store directory (default: per connection; while the hook is "
                   "installed, saves on qemu:///system need it listed in "
                   f"{CONFIG_PATH}: see install-hook --store)")


def _stop_on_signals() -> None:
    """SIGTERM (systemd stopping us) and SIGHUP (a closed SSH session) make
    running saves and restores roll back, then the command exits with their
    errors; a second signal changes nothing (the roll-back must finish)."""
    from . import watch

    def stop(signum: int, _frame: object) -> None:
        watch.abort(f"{signal.Signals(signum).name} received")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        _stop_on_signals()
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("fastsave: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for humans, a traceback with --debug
        if args.debug:
            raise
        print(f"fastsave: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
