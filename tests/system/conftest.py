"""The system libvirtd's fixtures, for this folder only (see testkit/system_daemon.py)."""
from testkit.system_daemon import make_system_guest, system_conn, system_libvirtd  # noqa: F401
