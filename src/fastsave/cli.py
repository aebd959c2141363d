"""The `fastsave` command: managed save from the shell and from boot scripts.

Exit codes: 0 success; 1 the operation failed; 2 bad usage; 3 some domains
failed (save-all, restore-all, autostart); 4 an image failed verification.
Errors print one line unless --debug is given.
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
    return open_connection(args.uri, readonly=readonly)


def _domain(conn: Any, ident: str) -> Any:
    import libvirt
    for lookup in (conn.lookupByName, conn.lookupByUUIDString):
        try:
            return lookup(ident)
        except libvirt.libvirtError:
            continue
    from .virt import fail
    raise fail(libvirt.VIR_ERR_NO_DOMAIN, f"Domain not found: {ident}")


def _options(args: argparse.Namespace) -> Any:
    from .managed import Options
    kw: dict[str, Any] = {}
    for name in ("mode", "level", "threads", "image_dir"):
        if getattr(args, name, None) is not None:
            kw[name] = getattr(args, name)
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
        managed_save(_domain(conn, ident), flags, options=_options(args))
        _out(args, {"domain": ident, "saved": True}, f"Domain '{ident}' state saved by fastsave")
    return 0


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
    if args.json:
        print(json.dumps({
            "ok": report.ok, "seconds": round(report.seconds, 3), "bytes": report.total_bytes,
            "mb_per_s": round(report.mb_per_s, 1),
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


def cmd_save_all(args: argparse.Namespace) -> int:
    from .bulk import save_all
    conn = _conn(args)
    return _bulk(args, "save", lambda on_start: save_all(
        conn, names=args.domain or None, match=args.match, parallel=args.parallel,
        timeout=args.timeout, on_timeout=args.on_timeout, options=_options(args),
        on_start=on_start))


def cmd_restore_all(args: argparse.Namespace) -> int:
    from .bulk import restore_all
    conn = _conn(args)
    return _bulk(args, "restore", lambda on_start: restore_all(
        conn, include_all=args.all, names=args.domain or None, match=args.match,
        parallel=args.parallel, options=_options(args), on_start=on_start))


def cmd_autostart(args: argparse.Namespace) -> int:
    args.domain, args.match = [], None
    return cmd_restore_all(args)


def cmd_list(args: argparse.Namespace) -> int:
    import time as _time

    from . import engine
    from .managed import image_store
    conn = _conn(args, readonly=True)
    with image_store(conn, args.image_dir) as store:
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
    from .units import install_units
    for path in install_units(args.unit_dir, args.env_file):
        print(f"wrote {path}")
    cmd_install_hook(argparse.Namespace(store=None))
    print("then: systemctl daemon-reload && systemctl enable --now fastsave-guests.service")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastsave", description=__doc__.splitlines()[0])
    p.add_argument("--uri", default=os.environ.get("FASTSAVE_URI", DEFAULT_URI),
                   help="libvirt URI (default: $FASTSAVE_URI or %(default)s)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--image-dir", help="image store directory (default: per connection; while "
                   "the hook is installed, saves on qemu:///system need it listed in "
                   f"{CONFIG_PATH}: see install-hook --store)")
    sub = p.add_subparsers(dest="cmd", required=True)

    def engine_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--mode", choices=["auto", "zstd", "raw"])
        sp.add_argument("--level", type=int)
        sp.add_argument("--threads", type=int)
        sp.add_argument("--direct", action=argparse.BooleanOptionalAction, default=None)

    s = sub.add_parser("save", help="managed-save running domains and stop them")
    s.add_argument("domain", nargs="+")
    s.add_argument("--bypass-cache", action="store_true")
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

    s = sub.add_parser("save-all", help="managed-save all running domains concurrently")
    bulk_opts(s)
    s.add_argument("--timeout", type=float, help="seconds; domains not started by then get --on-timeout")
    s.add_argument("--on-timeout", choices=["leave", "shutdown", "destroy"], default="leave")
    s.set_defaults(func=cmd_save_all)

    s = sub.add_parser("restore-all", help="restore saved domains (autostart ones; --all: all)")
    bulk_opts(s)
    s.add_argument("--all", action="store_true")
    s.set_defaults(func=cmd_restore_all)

    s = sub.add_parser("autostart", help="host boot: restore autostart domains with a saved state")
    s.add_argument("--all", action="store_true", help="every shut-off domain with a saved state")
    s.add_argument("--parallel", type=int)
    engine_opts(s)
    s.set_defaults(func=cmd_autostart)

    s = sub.add_parser("list", help="domains with a saved state")
    s.set_defaults(func=cmd_list)

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
    s.add_argument("--env-file", default="/etc/default/fastsave")
    s.set_defaults(func=cmd_install_units)
    return p


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
