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


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
    """Servers built in the test process install signal handlers: put the old ones back."""
    import signal

    signums = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)
    saved = {s: signal.getsignal(s) for s in signums}
    yield
    for signum, handler in saved.items():
        if handler is not None and signal.getsignal(signum) is not handler:
            signal.signal(signum, handler)
