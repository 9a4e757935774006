"""What a pool tells systemd (``Type=notify``), decided from what its supervisor sees.

The supervisor calls :meth:`PoolNotifier.step` once per turn of its loop with the number of
workers serving and wanted, and :meth:`PoolNotifier.reloading` when a reload (USR1) or a
rolling replacement (HUP) begins; this class turns that into the messages systemd expects:

- ``READY=1`` with ``MAINPID`` once every wanted worker serves (not when the first one
  does: a unit ordered after this one must find the whole pool);
- ``RELOADING=1`` when a reload begins, ``READY=1`` again once the pool is whole again;
- ``STOPPING=1`` once, when the pool starts stopping;
- ``WATCHDOG=1`` every half ``WATCHDOG_USEC`` while the pool is whole and heartbeats come
  in: a pool that has lost its workers for good stops pinging and systemd restarts it.
"""

from spoon.systemd import Notifier

__all__ = ["PoolNotifier"]


class PoolNotifier:
    """``notifier``: a :class:`spoon.systemd.Notifier` (default: from the environment);
    ``pid``: the supervisor's pid, sent as ``MAINPID`` (the process systemd must watch,
    which is not the one it started when a wrapper forked it)."""

    def __init__(self, pid, notifier=None):
        self.notifier = notifier if notifier is not None else Notifier()
        self.pid = pid
        #: READY sent once; a reload waiting for its READY; STOPPING sent.
        self.ready = self.reload_pending = self.stopping = False
        self._last_ping = None

    @property
    def enabled(self):
        return self.notifier.enabled

    def reloading(self):
        if self.stopping:
            return
        self.reload_pending = True
        self.notifier.reloading()

    def handed_over(self, pid):
        """A new generation (an upgrade) took over: systemd watches ``pid`` from now on
        (None: the new one says so itself), and this generation's stop is no stop of the
        service (no ``STOPPING=1``)."""
        self.stopping = True
        if pid is not None:
            self.notifier.send("MAINPID=%d" % pid)

    def step(self, now, serving, wanted, stopping=False, replacing=False):
        """One look at the pool: ``serving`` workers answer (ready and not retiring),
        ``wanted`` are wanted, ``replacing``: a rolling replacement is under way."""
        if stopping:
            if not self.stopping:
                self.stopping = True
                self.notifier.stopping()
            return
        whole = serving >= wanted and not replacing
        if whole and not self.ready:
            self.ready = True
            self.reload_pending = False
            self.notifier.ready(status="%d worker(s) serving" % serving, mainpid=self.pid)
        elif whole and self.reload_pending:
            self.reload_pending = False
            self.notifier.ready(status="reloaded, %d worker(s) serving" % serving)
        interval = self.notifier.watchdog_interval
        if interval is not None and whole and self.ready:
            if self._last_ping is None or now - self._last_ping >= interval:
                self._last_ping = now
                self.notifier.watchdog()
