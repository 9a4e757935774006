"""Draining: how anything that serves connections stops without cutting off the requests it
is serving.

Every protocol factory spoon listens with (Gulp stream and datagram servers, a pool's plain
Twisted factory) provides :class:`IDrainable`; :class:`GracefulStop` is the one stop routine
that a single-process Spoon, a pool worker and :class:`spoon.service.ServeService` all run:
stop listening, wait until every drainable is idle or the grace period is over, then abort
what is still open.
"""

from twisted.internet import defer
from zope.interface import Attribute, Interface, implementer

__all__ = ["IDrainable", "IdleWaiters", "NothingToDrain", "GracefulStop", "ServingRun", "stop_reactor"]


class IDrainable(Interface):
    """Connections that a graceful stop waits for."""

    connections = Attribute("The connections open now (a sized collection).")

    def end_idle_sessions():
        """A graceful stop has begun: close the connections that are between two requests
        (a persistent session waiting for its next request), now and as others get
        there, so that the stop does not wait for idle clients to leave."""

    def when_idle():
        """A Deferred that fires (with None) once no connection is open; at once if none
        is."""

    def abort_all():
        """Close every open connection now (the grace period is over)."""


class IdleWaiters:
    """The Deferreds handed out by a drainable's ``when_idle()``, fired together when its
    last connection ends."""

    def __init__(self):
        self._waiting = []

    def wait(self, idle):
        """A Deferred for one ``when_idle()`` caller; already fired when ``idle``."""
        if idle:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiting.append(d)
        return d

    @property
    def pending(self):
        return bool(self._waiting)

    def fire(self):
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)


@implementer(IDrainable)
class NothingToDrain:
    """A drainable with no connections (a plain datagram protocol: nothing is in flight
    between two datagrams)."""

    connections = ()

    def end_idle_sessions(self):
        pass

    def when_idle(self):
        return defer.succeed(None)

    def abort_all(self):
        pass


class GracefulStop:
    """Stop ``ports`` (``IListeningPort``) listening, then wait for ``drainables``
    (:class:`IDrainable`) to be idle for at most ``grace`` seconds, then abort what is left.

    :meth:`when_done` gives a Deferred that fires (with None) once listening has stopped
    and the drainables are idle or aborted.  :meth:`abort_now` turns a graceful stop under
    way into a fast one.  ``log``: a stdlib-style logger (``info``/``warning`` with
    %-arguments).
    """

    def __init__(self, reactor, ports, drainables, grace, log):
        self.reactor = reactor
        self.drainables = list(drainables)
        self.grace = float(grace)
        self.log = log
        self.finished = False
        self._done_waiters = IdleWaiters()
        self._timer = None
        self._aborted = False
        self._finishing = False
        self._listening_stopped = defer.gatherResults(
            [defer.maybeDeferred(port.stopListening) for port in ports], consumeErrors=True
        )

    def when_done(self):
        """A new Deferred that fires once the stop is complete (at once if it is)."""
        return self._done_waiters.wait(self.finished)

    def open_connections(self):
        return sum(len(d.connections) for d in self.drainables)

    def start(self, graceful=True):
        """Begin the stop (a fast one when not ``graceful``); returns self."""
        if not graceful:
            self.abort_now()
            return self
        waiting = self.open_connections()
        if waiting:
            self.log.info(
                "Graceful stop: waiting for %d connection(s), at most %ss", waiting, self.grace
            )
        self._timer = self.reactor.callLater(self.grace, self._grace_over)
        for drainable in self.drainables:
            drainable.end_idle_sessions()
        idle = defer.gatherResults([d.when_idle() for d in self.drainables], consumeErrors=True)
        idle.addCallback(lambda _: self._finish())
        return self

    def _grace_over(self):
        self._timer = None
        left = self.open_connections()
        if left:
            self.log.warning("Closing %d connection(s) still open at the end of the stop", left)
        self.abort_now()

    def abort_now(self):
        """Close every connection now; the stop completes on the next reactor turn, once the
        aborts have reached the sockets."""
        if self._aborted:
            return
        self._aborted = True
        self._cancel_timer()
        for drainable in self.drainables:
            drainable.abort_all()
        self.reactor.callLater(0, self._finish)

    def _cancel_timer(self):
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _finish(self):
        if self._finishing:
            return
        self._finishing = True
        self._cancel_timer()
        self._listening_stopped.addBoth(self._finished)

    def _finished(self, _):
        self.finished = True
        self._done_waiters.fire()


class ServingRun:
    """One run of serving in ``reactor``: ``served`` fires once its (single) stop has
    drained; the caller that runs the reactor then stops it."""

    def __init__(self, reactor):
        self.reactor = reactor
        self.served = defer.Deferred()
        self._stop = None

    def begin_stop(self, graceful, ports, drainables, grace, log):
        """Start the :class:`GracefulStop` of ``ports`` and ``drainables`` (on the first
        call; later calls only turn it into a fast one when not ``graceful``).  Returns a
        Deferred fired once drained."""
        stop = self._stop
        if stop is None:
            stop = self._stop = GracefulStop(self.reactor, ports, drainables, grace, log)
            stop.when_done().chainDeferred(self.served)
            stop.start(graceful)
        elif not graceful:
            stop.abort_now()
        return stop.when_done()


def stop_reactor(reactor):
    """Stop ``reactor`` once the current turn is over (what has just been written or
    aborted reaches the sockets first); nothing if it is not running."""
    if reactor is not None and reactor.running:
        reactor.callLater(0, reactor.stop)
