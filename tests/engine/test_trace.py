"""fastsave.trace: the phase hook the scoreboard measures with."""
from __future__ import annotations

import logging
import time

import pytest

from fastsave import trace


@pytest.fixture(autouse=True)
def _clean():
    yield
    for cb in list(trace._callbacks):
        trace.remove(cb)


def test_emit_without_callbacks_does_nothing() -> None:
    trace.emit("save.migrating", "dom")  # no error, nothing to call


def test_callback_gets_event_domain_monotonic_time_and_details() -> None:
    got = []
    trace.add(lambda *a: got.append(a))
    t0 = time.monotonic()
    trace.emit("save.committed", "dom1", stats="S")
    (event, domain, when, details), = got
    assert (event, domain, details) == ("save.committed", "dom1", {"stats": "S"})
    assert t0 <= when <= time.monotonic()


def test_added_once_and_removed() -> None:
    got = []
    cb = got.append
    trace.add(lambda *a: cb(a[0]))
    f = trace._callbacks[0]
    trace.add(f)
    trace.emit("save.stopped", "d")
    assert got == ["save.stopped"]
    trace.remove(f)
    trace.remove(f)  # not added: no error
    trace.emit("save.stopped", "d")
    assert got == ["save.stopped"]


def test_failing_callback_never_raises_and_is_logged_once(caplog) -> None:
    got = []

    def bad(*a):
        raise RuntimeError("boom")

    trace.add(bad)
    trace.add(lambda *a: got.append(a[0]))
    with caplog.at_level(logging.WARNING, logger="fastsave.trace"):
        trace.emit("restore.incoming", "d")
        trace.emit("restore.streamed", "d")
    assert got == ["restore.incoming", "restore.streamed"]  # later callbacks still run
    assert len([r for r in caplog.records if r.name == "fastsave.trace"]) == 1
