"""systemd wiring: fastsave-guests.service, like libvirt-guests.service but
saving all guests at once.

At boot (ExecStart) it starts again the guests that were running when the
host went down, from their saved states, and the autostart domains that have
a saved state; at shutdown (ExecStop), while libvirtd/virtqemud and the
guests' QEMU processes still run, it saves (or powers off) every running
guest. Settings live in /etc/default/fastsave (config.HostSettings); both
commands read it themselves (`--settings`), so the unit carries no shell.

Why the unit looks as it does:
- `ExecStart=-`: a failed boot restore must not fail the unit. A oneshot
  unit whose start failed is not active, and systemd runs no ExecStop for
  an inactive unit: the guests started by hand afterwards would not be saved
  at shutdown. `RemainAfterExit=yes` keeps the unit active until shutdown.
- Ordering: units stop in the reverse order of their start, so `After=` the
  libvirt daemons, their sockets and virt-guest-shutdown.target (QEMU's
  machine scopes are ordered `Before=` it) means ExecStop runs while they
  all still run. Ordering only for the daemons: pulling them in would start
  libvirtd beside the modular virtqemud (or the reverse); they are socket
  activated. `Wants=` (not `Requires=`) the target: a libvirt without it
  is not an error.
- `RequiresMountsFor=` every image store: saving into an unmounted mount
  point, or a store unmounted before the saves end, would be wrong.
- libvirt-guests.service: both saving the same guests is wrong, and
  `Conflicts=` would make starting this unit *stop* libvirt-guests, which
  runs its shutdown action on every guest. Instead this unit is ordered
  `After=libvirt-guests.service`: at shutdown it stops first and saves the
  guests, and libvirt-guests then finds none running (and records none). The
  installer also warns while libvirt-guests is enabled.
- `TimeoutStopSec=` from SHUTDOWN_TIMEOUT (see stop_timeout).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys

from . import __version__
from .config import CONFIG_PATH, SETTINGS_PATH, SYSTEM_DIR, ConfigError, load_host_settings
from .config import load as load_config

__all__ = ["UNIT_NAME", "UNIT_DIR", "SETTINGS_TEXT", "unit_text", "stop_timeout", "install_units",
           "libvirt_guests_enabled"]

UNIT_NAME = "fastsave-guests.service"
UNIT_DIR = "/etc/systemd/system"
# What the saves under way at the deadline may take to finish, on top of it.
SAVE_ALLOWANCE_S = 600
LIBVIRT_UNITS = ("libvirtd.service", "libvirtd.socket", "virtqemud.service", "virtqemud.socket",
                 "virtlogd.socket", "virt-guest-shutdown.target")

SETTINGS_TEXT = """\
# Settings of fastsave-guests.service: what happens to the guests at host
# shutdown and boot. KEY=VALUE lines; an empty value means the default. The
# names are libvirt-guests' (/etc/default/libvirt-guests) where it has the
# setting. Read by 'fastsave save-all/restore-all --settings' when the unit
# runs them; a bad line is reported and its default used.
# After changing SHUTDOWN_TIMEOUT run 'fastsave install-units' again: the
# unit's TimeoutStopSec is sized from it.

# libvirt URI of the guests.
FASTSAVE_URI=qemu:///system

# At boot: start = start the guests that were running at shutdown (from
# their saved state where they have one, else a normal boot) and restore
# the autostart domains that have a saved state; ignore = start nothing
# (saved states are kept for 'fastsave start').
ON_BOOT=start

# Seconds between the beginnings of two starts at boot (0: none).
START_DELAY=0

# At shutdown: save = save every running guest, all at once; shutdown =
# ask every guest to power off (ACPI) and wait up to SHUTDOWN_TIMEOUT.
ON_SHUTDOWN=save

# Seconds (0: no limit). ON_SHUTDOWN=save: the deadline for a save to start.
# ON_SHUTDOWN=shutdown: the time guests get to power off.
SHUTDOWN_TIMEOUT=300

# What the guests left at the deadline get.
# ON_SHUTDOWN=save: leave (running, as libvirt-guests would) | destroy |
#   shutdown (ACPI, then up to SHUTDOWN_TIMEOUT more, then destroy).
# ON_SHUTDOWN=shutdown: save (default: nothing is lost, back at boot) |
#   destroy | leave.
# Empty: the first choice of each list.
FASTSAVE_ON_TIMEOUT=

# Guests saved (or shut down) at once; 0 or empty: from the CPU count
# (shutdown: all at once).
PARALLEL_SHUTDOWN=0

# 1: read and write images with O_DIRECT (libvirt-guests' BYPASS_CACHE).
BYPASS_CACHE=0

# Image format (auto | zstd | raw), zstd level, compression threads per save.
FASTSAVE_MODE=
FASTSAVE_LEVEL=
FASTSAVE_THREADS=

# Migration channels per save: auto (from the CPUs each save may use) or N
# (1: one stream; N > 1: QEMU's multifd).
FASTSAVE_CHANNELS=

# Image store (default: /var/lib/fastsave/images); it must be listed in
# /etc/fastsave/fastsave.conf. Run 'fastsave install-units' again after
# changing it (the unit requires its mount).
FASTSAVE_IMAGE_DIR=
"""


def stop_timeout(shutdown_timeout: float) -> str:
    """TimeoutStopSec for a SHUTDOWN_TIMEOUT: the deadline, as long again
    (FASTSAVE_ON_TIMEOUT=shutdown waits that long for a power-off), and time
    for the saves under way at the deadline. No limit stays no limit
    (poweroff.target still forces the power-off after 30 minutes)."""
    if not shutdown_timeout:
        return "infinity"
    return f"{int(2 * shutdown_timeout + SAVE_ALLOWANCE_S)}s"


def _stores(image_dir: str | None, config_path: str) -> list[str]:
    try:
        stores = list(load_config(config_path).guarded)
    except ConfigError:
        stores = [SYSTEM_DIR]
    if image_dir and image_dir not in stores:
        stores.append(image_dir)
    return stores


def unit_text(command: str, *, settings_path: str = SETTINGS_PATH, stores: list[str] | None = None,
              timeout_stop: str = "infinity") -> str:
    mounts = " ".join(_escape(s) for s in (stores or [SYSTEM_DIR]))
    settings = shlex.quote(settings_path)
    libvirt = " ".join(LIBVIRT_UNITS)
    return f"""\
# Written by fastsave {__version__} ('fastsave install-units'); see 'fastsave save-all --help'.
[Unit]
Description=Save running guests at shutdown and restore them at boot (fastsave)
Wants=virt-guest-shutdown.target
After=network.target time-sync.target {libvirt} libvirt-guests.service
RequiresMountsFor={mounts}

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=-{command} restore-all --boot --settings {settings}
ExecStop={command} save-all --record --settings {settings}
TimeoutStopSec={timeout_stop}
StandardOutput=journal+console

[Install]
WantedBy=multi-user.target
"""


def _escape(path: str) -> str:
    """A path for a space-separated unit setting (systemd's C-style escapes)."""
    return "".join(c if c.isalnum() or c in "/._-+:@" else "\\x%02x" % ord(c) for c in path)


def _command() -> str:
    exe = shutil.which("fastsave")
    if exe:
        return exe
    return f"{sys.executable} -m fastsave"


def libvirt_guests_enabled() -> bool:
    """libvirt-guests.service is enabled (False where systemctl cannot tell)."""
    try:
        r = subprocess.run(["systemctl", "is-enabled", "libvirt-guests.service"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.stdout.strip() in ("enabled", "enabled-runtime")


def _write(path: str, text: str, mode: int) -> None:
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def install_units(unit_dir: str = UNIT_DIR, env_file: str = SETTINGS_PATH, *,
                  config_path: str = CONFIG_PATH, command: str | None = None) -> list[str]:
    """Writes the settings file when there is none, then the unit sized from
    it (TimeoutStopSec, RequiresMountsFor); returns the paths written."""
    written = []
    if not os.path.exists(env_file):
        _write(env_file, SETTINGS_TEXT, 0o644)
        written.append(env_file)
    settings, _ = load_host_settings(env_file)
    unit = os.path.join(unit_dir, UNIT_NAME)
    _write(unit, unit_text(command or _command(), settings_path=env_file,
                           stores=_stores(settings.image_dir, config_path),
                           timeout_stop=stop_timeout(settings.shutdown_timeout)), 0o644)
    written.insert(0, unit)
    return written
