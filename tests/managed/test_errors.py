"""libvirt's error semantics, with real connections."""
from __future__ import annotations

import libvirt
import pytest

import fastsave
from fastsave import virt

pytestmark = pytest.mark.qemu

CALLS = [
    ("managed_save", fastsave.managed_save),
    ("has_managed_save_image", fastsave.has_managed_save_image),
    ("managed_save_remove", fastsave.managed_save_remove),
    ("start", fastsave.start),
]


def code(excinfo: pytest.ExceptionInfo) -> int:
    assert isinstance(excinfo.value, libvirt.libvirtError)
    return excinfo.value.get_error_code()


@pytest.mark.parametrize("name,call", CALLS)
@pytest.mark.parametrize("bad", [None, "dom", 42, object()])
def test_invalid_domain(name, call, bad):
    with pytest.raises(libvirt.libvirtError) as ei:
        call(bad)
    assert code(ei) == libvirt.VIR_ERR_INVALID_DOMAIN


@pytest.mark.parametrize("name,call", CALLS)
def test_undefined_domain(make_guest, name, call):
    dom = make_guest(64, start=False)
    dom.undefine()
    with pytest.raises(libvirt.libvirtError) as ei:
        call(dom)
    assert code(ei) in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_INVALID_DOMAIN)


@pytest.mark.parametrize("name,call,flags", [
    ("managed_save", fastsave.managed_save, 1 << 10),
    ("managed_save", fastsave.managed_save, libvirt.VIR_DOMAIN_SAVE_RUNNING | libvirt.VIR_DOMAIN_SAVE_PAUSED),
    ("has_managed_save_image", fastsave.has_managed_save_image, 1),
    ("managed_save_remove", fastsave.managed_save_remove, 1),
    ("start", fastsave.start, libvirt.VIR_DOMAIN_START_AUTODESTROY),
    ("start", fastsave.start, -1),
])
def test_bad_flags(make_guest, name, call, flags):
    dom = make_guest(64)
    with pytest.raises(libvirt.libvirtError) as ei:
        call(dom, flags)
    assert code(ei) == libvirt.VIR_ERR_INVALID_ARG
    assert dom.isActive()  # nothing happened


def test_transient_domain(make_guest):
    dom = make_guest(64, persistent=False)
    with pytest.raises(libvirt.libvirtError) as ei:
        fastsave.managed_save(dom)
    assert code(ei) == libvirt.VIR_ERR_OPERATION_INVALID
    assert "transient" in str(ei.value)
    assert dom.isActive()


def test_shut_off_domain(make_guest):
    dom = make_guest(64, start=False)
    with pytest.raises(libvirt.libvirtError) as ei:
        fastsave.managed_save(dom)
    assert code(ei) == libvirt.VIR_ERR_OPERATION_INVALID
    assert "not running" in str(ei.value)
    assert fastsave.has_managed_save_image(dom) == 0


@pytest.mark.parametrize("name,call", CALLS)
def test_unsupported_driver(name, call):
    conn = libvirt.open("test:///default")
    dom = conn.lookupByName("test")
    with pytest.raises(libvirt.libvirtError) as ei:
        call(dom)
    assert code(ei) == libvirt.VIR_ERR_NO_SUPPORT
    assert dom.isActive()


def test_errors_are_libvirt_errors():
    e = virt.fail(libvirt.VIR_ERR_OPERATION_INVALID, "x")
    assert isinstance(e, libvirt.libvirtError)
    assert e.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID
    assert e.get_error_message() == "x"
