"""What the pool drives: the interfaces between the supervisor and what it serves.

The supervisor and its workers know a target only through :class:`IPoolTarget`, and a target
knows the supervisor running it only through :class:`IPool`.  The Spoon/Spork classes
(:mod:`spoon.server`) and the plain-factory target (:mod:`spoon.pool.factory`) provide
``IPoolTarget``; this package never imports :mod:`spoon.server`.
"""

from zope.interface import Attribute, Interface

__all__ = ["IPoolTarget", "IPool", "IRequestCounting"]


class IPoolTarget(Interface):
    """Something a pre-forked pool serves on a socket its workers share."""

    socket = Attribute("The bound socket (listening, for streams) every worker serves.")
    log = Attribute("The stdlib logger the pool writes its lines to.")
    pool_name = Attribute("What the target is, for process titles (``myapp.Server``).")
    pool_workers = Attribute("How many workers the pool runs unless told otherwise.")
    graceful_timeout = Attribute(
        "Seconds a graceful stop waits for in-flight work.  The supervisor sets it to the "
        "pool's value before forking, so that the workers drain for as long as it waits."
    )
    worker_timeout = Attribute(
        "Seconds a worker may go without a heartbeat before it is killed (None: the pool's "
        "default)."
    )
    signal_shutdown = Attribute("Signal for a graceful stop (None: SIGTERM).")
    signal_reload = Attribute("Signal for a configuration reload (None: SIGUSR1).")

    def reload():
        """Load the configuration again (in the supervisor, or in a worker); a failure is
        logged and the previous configuration kept."""

    def serve(reactor, shared):
        """Listen on ``socket`` in ``reactor`` (not running yet).  ``shared``: other
        processes accept on the same socket, so take connections one by one (a busy worker
        must not hoard them).  Returns a Deferred that fires once serving has ended (after
        :meth:`begin_stop`'s drain), when the caller stops the reactor."""

    def begin_stop(graceful):
        """Stop accepting, then (``graceful``) let in-flight work finish for at most
        ``graceful_timeout`` seconds, or (not ``graceful``) close every connection now.
        Returns a Deferred that fires once drained.  Called in the reactor thread; calling
        it again with ``graceful=False`` turns a graceful stop into a fast one."""

    def signal_handlers():
        """``{signum: handler(signum, frame)}`` a worker installs: at least one graceful
        stop (its ``signal_shutdown`` and SIGTERM), a fast stop (SIGINT, SIGQUIT) and a
        reload.  The handlers must only schedule work in the reactor."""

    def pool_started(pool):
        """This process now supervises a pool (:class:`IPool`) of this target."""

    def pool_stopped():
        """The pool this process supervised has stopped."""

    def became_worker(number):
        """This (forked) process is worker ``number`` of the pool."""


class IPool(Interface):
    """What a target may ask of the supervisor running it (from any thread or a signal
    handler)."""

    pids = Attribute("The pids of the live workers (a list the supervisor keeps current).")

    def request(signum):
        """Act as if the supervisor had received ``signum``."""

    def request_stop(graceful):
        """Stop the pool; from another thread, wait until it has stopped."""


class IRequestCounting(Interface):
    """A target that reports each request it serves, so that a pool worker can retire
    after ``max_requests`` or once it outgrows ``max_worker_memory``
    (:mod:`spoon.pool.retire`)."""

    max_requests = Attribute("Requests a worker serves before it is replaced (0: no limit).")
    max_requests_jitter = Attribute(
        "Up to this many requests more, drawn per worker, so that workers started together "
        "are not replaced together."
    )
    max_worker_memory = Attribute(
        "Resident bytes beyond which a worker is replaced, checked between requests (0: no "
        "limit)."
    )

    def watch_requests(observer):
        """Call ``observer(exc)`` once each request this process serves has ended: ``exc``
        is the exception that escaped its handler, or None."""
