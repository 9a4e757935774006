"""What a pool tells systemd, step by step: a recording notifier, a clock the test moves."""

from spoon.pool.notify import PoolNotifier


class Recorder:
    """Stands for spoon.systemd.Notifier: records what would be sent."""

    enabled = True

    def __init__(self, watchdog_interval=None):
        self.watchdog_interval = watchdog_interval
        self.sent = []

    def ready(self, status=None, mainpid=None):
        self.sent.append(("READY", mainpid))

    def reloading(self):
        self.sent.append(("RELOADING",))

    def stopping(self):
        self.sent.append(("STOPPING",))

    def watchdog(self):
        self.sent.append(("WATCHDOG",))


def test_ready_once_every_wanted_worker_serves_with_the_supervisor_as_main_pid():
    rec = Recorder()
    pool = PoolNotifier(4242, rec)
    pool.step(0.0, serving=0, wanted=2)
    pool.step(0.1, serving=1, wanted=2)
    assert rec.sent == []
    pool.step(0.2, serving=2, wanted=2)
    pool.step(0.3, serving=2, wanted=2)
    assert rec.sent == [("READY", 4242)]


def test_reload_is_reloading_then_ready_once_the_replacement_is_done():
    rec = Recorder()
    pool = PoolNotifier(1, rec)
    pool.step(0, 2, 2)
    pool.reloading()
    pool.step(1, 2, 2, replacing=True)
    pool.step(2, 1, 2, replacing=True)
    assert rec.sent == [("READY", 1), ("RELOADING",)]
    pool.step(3, 2, 2)
    assert rec.sent[-1] == ("READY", None) and len(rec.sent) == 3


def test_stopping_is_sent_once_and_ends_the_watchdog():
    rec = Recorder(watchdog_interval=1.0)
    pool = PoolNotifier(1, rec)
    pool.step(0, 1, 1)
    pool.step(0.5, 1, 1, stopping=True)
    pool.step(5, 1, 1, stopping=True)
    pool.reloading()
    assert rec.sent == [("READY", 1), ("WATCHDOG",), ("STOPPING",)]


def test_watchdog_pings_every_interval_only_while_the_pool_is_whole():
    rec = Recorder(watchdog_interval=1.0)
    pool = PoolNotifier(1, rec)
    pool.step(0.0, 0, 2)  # not ready yet: no ping
    for t in (1.0, 1.5, 2.0, 2.4, 3.1):
        pool.step(t, 2, 2)
    pings = [t for t in rec.sent if t == ("WATCHDOG",)]
    assert len(pings) == 3  # at 1.0, 2.0, 3.1
    pool.step(10.0, 1, 2)  # a worker lost and not back: no ping
    assert rec.sent.count(("WATCHDOG",)) == 3
