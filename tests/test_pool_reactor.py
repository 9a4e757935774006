"""The one place that touches Twisted's private reactor state
(:func:`spoon.pool.reactor.renew_inherited_reactor`): these tests fail if a Twisted release
changes what it relies on, for every reactor kind it accepts.

Each case runs in a fresh interpreter (installing a reactor must not touch the test
process): install the reactor, fork, renew it in the child, then check that the child's
reactor has kernel objects of its own and still runs.
"""

import subprocess
import sys
import textwrap

import pytest

from spoon.pool.reactor import RENEWABLE_REACTORS

CHILD_CHECK = textwrap.dedent(
    """
    import importlib, os, sys
    module_name, class_name = sys.argv[1].rsplit(".", 1)
    importlib.import_module(module_name).install()
    from twisted.internet import reactor
    from spoon.pool.reactor import check_forkable, renew_inherited_reactor

    assert type(reactor).__name__ == class_name, type(reactor)
    check_forkable()  # accepted: not running, of a renewable kind
    old_waker = reactor.waker
    old_poller = getattr(reactor, "_poller", None)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            assert renew_inherited_reactor() is True
            assert reactor.waker is not old_waker, "waker not renewed"
            if old_poller is not None and hasattr(old_poller, "closed"):
                assert old_poller.closed, "inherited epoll left open"
                assert reactor._poller is not old_poller and not reactor._poller.closed
            ran = []
            reactor.callLater(0.01, lambda: (ran.append(1), reactor.stop()))
            reactor.callLater(5, reactor.stop)
            reactor.run(installSignalHandlers=False)
            assert ran == [1], "the renewed reactor did not run its timer"
            code = 0
        except BaseException as e:
            print("CHILD", type(e).__name__, e, flush=True)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    # The parent's reactor is untouched by the child's renewal.
    assert getattr(reactor, "_poller", old_poller) is old_poller
    if old_poller is not None and hasattr(old_poller, "closed"):
        assert not old_poller.closed
    print("CHILD EXIT", os.waitstatus_to_exitcode(status), flush=True)
    """
)


@pytest.mark.parametrize("reactor_class", sorted(RENEWABLE_REACTORS))
def test_a_forked_child_renews_the_inherited_reactor_and_runs_it(reactor_class):
    out = subprocess.run(
        [sys.executable, "-c", CHILD_CHECK, reactor_class],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "CHILD EXIT 0" in out.stdout, out.stdout + out.stderr


def test_without_an_inherited_reactor_there_is_nothing_to_renew():
    code = "from spoon.pool.reactor import renew_inherited_reactor; print(renew_inherited_reactor())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
