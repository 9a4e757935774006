"""Fixtures shared by the test modules."""

import pytest

from support import ServerProcess


@pytest.fixture
def server_process():
    """Start real server processes; all of them are killed (by process group) at the end."""
    started = []

    def start(source, **kwargs):
        proc = ServerProcess(source, **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()
