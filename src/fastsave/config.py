"""fastsave's one configuration file, read by the command, the library and
the libvirt hook.

    /etc/fastsave/fastsave.conf

It lists the image stores that saves on `qemu:///system` may use, so that the
hook, which reads it at every domain start, guards all of them:

    # comments and blank lines are ignored
    store = /srv/fastsave/images
    store = /mnt/big/fastsave

`store = PATH` (absolute, one per line, repeatable) is the only key. The
system store, /var/lib/fastsave/images, is always guarded and need not be
listed. A missing file means just that store; a file that cannot be read or
parsed is an error everywhere: the command and the library refuse to save,
and the hook refuses every start.

The path is a constant, not taken from the environment: a root process must
not let its environment choose which stores the guard covers. Tests pass
another path explicitly.

The file must be a regular file that only root can change. This module uses
the standard library only; `read_text` and `parse_text` are copied verbatim
into the hook script, which must not import fastsave.

The host shutdown and boot settings of fastsave-guests.service (libvirt-guests'
ON_BOOT, ON_SHUTDOWN, ... and fastsave's own) live apart, in
/etc/default/fastsave, where libvirt-guests keeps its own: see
`load_host_settings`. Only the commands the unit runs read them, and only
when told to (`--settings FILE`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

__all__ = ["CONFIG_PATH", "SYSTEM_DIR", "HOOK_DIR", "HOOK_NAME", "STORE_MARKER",
           "Config", "ConfigError", "read_text", "parse_text", "load", "add_stores",
           "hook_installed", "SETTINGS_PATH", "HostSettings", "load_host_settings",
           "parse_host_settings"]

CONFIG_PATH = "/etc/fastsave/fastsave.conf"
SYSTEM_DIR = "/var/lib/fastsave/images"
HOOK_DIR = "/etc/libvirt/hooks/qemu.d"
HOOK_NAME = "fastsave"
# Written into a store when it is created: a store directory without it is
# not mounted (or not a store), and the hook cannot tell what it holds.
STORE_MARKER = ".fastsave-store"

_HEADER = """\
# fastsave configuration, read by the fastsave command and library and, at
# every domain start, by the libvirt hook (/etc/libvirt/hooks/qemu.d/fastsave).
#
# Image stores that saves on qemu:///system may use, one `store = PATH` line
# each (absolute paths). The hook refuses a plain start of a domain that has
# a saved state in any of them, and refuses every start while one of them is
# missing or not mounted. /var/lib/fastsave/images is always one of them.
# Saves into a store not listed here are refused while the hook is installed.
"""


class ConfigError(Exception):
    """The configuration file cannot be read or is not valid."""


def read_text(path: str) -> str | None:
    """The file's text, or None if there is none. Raises ValueError if it
    cannot be read or if a user other than root (or this process's) could
    have changed it. Standard library only: the hook script carries a copy."""
    import os
    import stat
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ValueError("cannot read %s: %s" % (path, e.strerror))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("%s is not a regular file" % path)
        if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
            raise ValueError("%s may be changed by users other than root (owner uid %d, mode %o); "
                             "run 'chown root: %s; chmod 644 %s'"
                             % (path, st.st_uid, stat.S_IMODE(st.st_mode), path, path))
        try:
            return f.read().decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError("cannot read %s: %s" % (path, e))


def parse_text(text: str) -> dict[str, list[str]]:
    """Parses the configuration text; returns {"store": [absolute paths]}.
    Raises ValueError naming the line at fault. Standard library only: the
    hook script carries a copy of this function."""
    import os.path
    stores = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ValueError("line %d: expected 'key = value', got %r" % (n, raw))
        if key != "store":
            raise ValueError("line %d: unknown setting %r (known: store)" % (n, key))
        if not value.startswith("/") or "\0" in value:
            raise ValueError("line %d: store must be an absolute path, got %r" % (n, value))
        path = os.path.normpath(value)
        if path.startswith("//"):
            path = "/" + path.lstrip("/")
        if path not in stores:
            stores.append(path)
    return {"store": stores}


@dataclasses.dataclass(frozen=True)
class Config:
    path: str
    stores: tuple[str, ...] = ()
    exists: bool = False

    @property
    def guarded(self) -> tuple[str, ...]:
        """Every store the hook guards: the system store, then the listed ones."""
        return (SYSTEM_DIR, *(s for s in self.stores if s != SYSTEM_DIR))


def load(path: str = CONFIG_PATH) -> Config:
    """The configuration; a missing file is the defaults."""
    try:
        text = read_text(path)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if text is None:
        return Config(path)
    try:
        data = parse_text(text)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    return Config(path, tuple(data["store"]), True)


def add_stores(stores: list[str], path: str = CONFIG_PATH) -> Config:
    """Lists `stores` in the configuration (creating it when there is none),
    keeping what is there; returns the new configuration."""
    cfg = load(path)
    new = []
    for s in stores:
        p = os.path.normpath(os.path.abspath(s))
        if p != SYSTEM_DIR and p not in cfg.stores and p not in new:
            new.append(p)
    if not new and cfg.exists:
        return cfg
    text = read_text(path) if cfg.exists else None
    if text is None:
        text = _HEADER
    elif text and not text.endswith("\n"):
        text += "\n"
    text += "".join(f"store = {p}\n" for p in new)
    parse_text(text)  # never write what the hook would refuse
    d = os.path.dirname(path)
    os.makedirs(d, mode=0o755, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return load(path)


def hook_installed(hook_dir: str = HOOK_DIR) -> bool:
    return os.path.lexists(os.path.join(hook_dir, HOOK_NAME))


def parser_source() -> str:
    """The source of read_text and parse_text, for the hook script."""
    import inspect
    return inspect.getsource(read_text) + "\n\n" + inspect.getsource(parse_text)


# -- host shutdown and boot settings (/etc/default/fastsave)

SETTINGS_PATH = "/etc/default/fastsave"


@dataclasses.dataclass(frozen=True)
class HostSettings:
    """What fastsave-guests.service does at host shutdown and boot. The names
    of the file's keys are libvirt-guests' where libvirt-guests has the setting."""

    uri: str | None = None            # FASTSAVE_URI (None: the command's default)
    on_boot: str = "start"            # ON_BOOT: start | ignore
    start_delay: float = 0.0          # START_DELAY: seconds between two starts at boot
    on_shutdown: str = "save"         # ON_SHUTDOWN: save | shutdown
    shutdown_timeout: float = 300.0   # SHUTDOWN_TIMEOUT: seconds; 0 means no limit
    parallel: int | None = None       # PARALLEL_SHUTDOWN: domains at once; 0/empty: from the CPUs
    on_timeout: str | None = None     # FASTSAVE_ON_TIMEOUT: leave | shutdown | destroy | save
    bypass_cache: bool = False        # BYPASS_CACHE: 1 reads and writes images with O_DIRECT
    mode: str | None = None           # FASTSAVE_MODE: auto | zstd | raw
    level: int | None = None          # FASTSAVE_LEVEL
    threads: int | None = None        # FASTSAVE_THREADS
    channels: int | str | None = None  # FASTSAVE_CHANNELS: auto | N (migration channels per save)
    image_dir: str | None = None      # FASTSAVE_IMAGE_DIR


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(v: str) -> str:
        if v not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}")
        return v
    return parse


def _seconds(v: str) -> float:
    x = float(v)
    if not x >= 0 or x == float("inf"):
        raise ValueError("expected a number of seconds >= 0")
    return x


def _count(v: str) -> int | None:
    n = int(v)
    if n < 0:
        raise ValueError("expected a count >= 0")
    return n or None


def _positive(v: str) -> int:
    n = int(v)
    if n < 1:
        raise ValueError("expected a number >= 1")
    return n


def _bool01(v: str) -> bool:
    if v not in ("0", "1"):
        raise ValueError("expected 0 or 1")
    return v == "1"


def _abspath(v: str) -> str:
    if not v.startswith("/") or "\0" in v:
        raise ValueError("expected an absolute path")
    return os.path.normpath(v)


def _level(v: str) -> int:
    return int(v)


_KEYS = {
    "FASTSAVE_URI": ("uri", str),
    "ON_BOOT": ("on_boot", _choice("start", "ignore")),
    "START_DELAY": ("start_delay", _seconds),
    "ON_SHUTDOWN": ("on_shutdown", _choice("save", "shutdown")),
    "SHUTDOWN_TIMEOUT": ("shutdown_timeout", _seconds),
    "PARALLEL_SHUTDOWN": ("parallel", _count),
    "FASTSAVE_ON_TIMEOUT": ("on_timeout", _choice("leave", "shutdown", "destroy", "save")),
    "BYPASS_CACHE": ("bypass_cache", _bool01),
    "FASTSAVE_MODE": ("mode", _choice("auto", "zstd", "raw")),
    "FASTSAVE_LEVEL": ("level", _level),
    "FASTSAVE_THREADS": ("threads", _positive),
    "FASTSAVE_CHANNELS": ("channels", lambda v: v if v == "auto" else _positive(v)),
    "FASTSAVE_IMAGE_DIR": ("image_dir", _abspath),
}
# Earlier names, still read: a settings file is kept across upgrades.
_OLD_KEYS = {"FASTSAVE_TIMEOUT": "SHUTDOWN_TIMEOUT", "FASTSAVE_PARALLEL": "PARALLEL_SHUTDOWN"}


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def parse_host_settings(text: str, path: str = SETTINGS_PATH) -> tuple[HostSettings, list[str]]:
    """Parses KEY=VALUE lines (shell syntax without expansion: the file stays
    readable by sh and by systemd's EnvironmentFile=). Returns the settings
    and one warning per line that was not used; a bad line never stops the
    rest: at host shutdown, saving with a default beats not saving."""
    values: dict[str, object] = {}
    warnings: list[str] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        key, value = key.strip(), _unquote(value.strip())
        if not sep:
            warnings.append(f"{path}:{n}: expected KEY=VALUE, got {raw!r}; line ignored")
            continue
        key = _OLD_KEYS.get(key, key)
        if key not in _KEYS:
            warnings.append(f"{path}:{n}: unknown setting {key!r} ignored")
            continue
        field, parse = _KEYS[key]
        if value == "":
            continue  # empty: the default
        try:
            values[field] = parse(value)
        except ValueError as e:
            warnings.append(f"{path}:{n}: {key}={value!r} ignored ({e}); using the default")
    return HostSettings(**values), warnings  # type: ignore[arg-type]


def load_host_settings(path: str = SETTINGS_PATH) -> tuple[HostSettings, list[str]]:
    """The settings in `path` (defaults when it is missing) and warnings. A
    file that others than root could change is not used at all (a warning
    says why): a root process does not take orders from it."""
    try:
        text = read_text(path)
    except ValueError as e:
        return HostSettings(), [f"{e}; using the default settings"]
    if text is None:
        return HostSettings(), []
    return parse_host_settings(text, path)
