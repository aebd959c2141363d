import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "qemu: needs qemu-system-x86_64 (real QEMU runs)")
