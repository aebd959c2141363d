"""The `fastsave` command: managed save from the shell and from boot scripts.

Exit codes: 0 success; 1 the operation failed; 2 bad usage; 3 some domains
failed (autostart). Errors print one line unless --debug is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

__all__ = ["main"]

DEFAULT_URI = "qemu:///system"


def _conn(args: argparse.Namespace, readonly: bool = False) -> Any:
    from .connect import open_connection
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


def cmd_autostart(args: argparse.Namespace) -> int:
    from .managed import autostart
    results = autostart(_conn(args), include_all=args.all, options=_options(args))
    failed = [(n, e) for n, e in results if e is not None]
    if args.json:
        print(json.dumps([{"domain": n, "ok": e is None, "error": None if e is None else str(e)}
                          for n, e in results]))
    else:
        for n, e in results:
            print(f"{n}: restored" if e is None else f"{n}: FAILED: {e}")
        if not results:
            print("no domain to restore")
    return 3 if failed else 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from . import engine
    info = engine.verify(args.image).info if args.verify else engine.inspect(args.image)
    data = dataclasses.asdict(info)
    if args.json:
        print(json.dumps(data, default=str))
    else:
        for k, v in data.items():
            if k != "xml":
                print(f"{k:18} {v}")
    return 0


def cmd_install_hook(args: argparse.Namespace) -> int:
    from .hook import install_hook
    from .store import default_image_dir
    stores = args.store or [default_image_dir("system", {})]
    path = install_hook(stores)
    print(f"installed {path}; restart libvirtd for it to take effect")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastsave", description=__doc__.splitlines()[0])
    p.add_argument("--uri", default=os.environ.get("FASTSAVE_URI", DEFAULT_URI),
                   help="libvirt URI (default: $FASTSAVE_URI or %(default)s)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--image-dir", help="image store directory (default: per connection)")
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

    s = sub.add_parser("autostart", help="host boot: restore autostart domains with a saved state")
    s.add_argument("--all", action="store_true", help="every shut-off domain with a saved state")
    s.set_defaults(func=cmd_autostart)

    s = sub.add_parser("inspect", help="show an image's metadata (--verify: check all data)")
    s.add_argument("image")
    s.add_argument("--verify", action="store_true")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("install-hook", help="install the libvirt hook that guards saved states")
    s.add_argument("--store", action="append", help="image store(s) the hook guards")
    s.set_defaults(func=cmd_install_hook)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
