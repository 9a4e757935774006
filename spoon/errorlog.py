"""What a failure says about who is at fault, and how often the log repeats it.

A server on the network edge sees clients reset, vanish and stall all day, and a hostile
one can make a buggy handler raise on every request.  Logging a full traceback each time
turns either into a log flood.  So:

- a fault of the peer (reset, closed, timed out, sent an over-long line) is not a bug of
  the server: :func:`peer_fault` names it in a few words, for one INFO line without a
  traceback;
- the same failure from the same place (a handler bug hit again and again) is logged once
  with its traceback, then counted: :class:`RepeatLimiter` writes one line with the count
  per interval while it goes on, and forgets it after a quiet interval.
"""

import errno
import socket

__all__ = ["peer_fault", "origin", "RepeatLimiter", "repeated"]

#: Cap on the distinct failures remembered at once (each is a code location, so the real
#: number is small; the cap only bounds memory whatever happens).
MAX_TRACKED = 1024


def peer_fault(exc):
    """A few words saying what the peer did, when ``exc`` is the peer's doing (not a bug
    of the server); None otherwise."""
    from spoon.greenio import LineTooLong

    if isinstance(exc, ConnectionResetError):
        return "connection reset by the client"
    if isinstance(exc, ConnectionAbortedError):
        return "connection aborted (the server was stopping)"
    if isinstance(exc, BrokenPipeError):
        return "client went away before the reply was sent"
    if isinstance(exc, socket.timeout):
        return "timed out waiting for the client"
    if isinstance(exc, LineTooLong):
        return "sent a line longer than the handler's max_line_length"
    if isinstance(exc, OSError) and exc.errno in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN):
        return "connection lost (%s)" % (exc.strerror or exc)
    return None


def origin(exc_type, tb):
    """A key for "the same failure from the same place": the exception's type and the
    code location of every frame of its traceback."""
    frames = []
    while tb is not None:
        frames.append((tb.tb_frame.f_code.co_filename, tb.tb_lineno))
        tb = tb.tb_next
    return (exc_type, tuple(frames))


class RepeatLimiter:
    """Let the first occurrence of a failure through, then count repeats and report the
    count every ``interval`` seconds while they go on.

    ``clock`` provides ``seconds()`` and ``callLater()`` (a reactor, or
    ``twisted.internet.task.Clock`` in tests); ``summarize(count, interval, last)`` is
    called with the number of repeats in the interval just ended and the ``detail`` of
    the last one.
    """

    def __init__(self, clock, summarize, interval=10.0):
        self.clock = clock
        self.summarize = summarize
        self.interval = interval
        self._counts = {}  # key -> [repeats in this interval, detail of the last one]

    def admit(self, key, detail=None):
        """True when this occurrence of ``key`` should be logged in full."""
        entry = self._counts.get(key)
        if entry is None:
            if len(self._counts) >= MAX_TRACKED:
                return True
            self._counts[key] = [0, detail]
            self.clock.callLater(self.interval, self._interval_ended, key)
            return True
        entry[0] += 1
        entry[1] = detail
        return False

    def _interval_ended(self, key):
        entry = self._counts.get(key)
        if entry is None:
            return
        count, detail = entry
        if count == 0:
            # Quiet for a whole interval: the next one is logged in full again.
            del self._counts[key]
            return
        entry[0] = 0
        self.clock.callLater(self.interval, self._interval_ended, key)
        self.summarize(count, self.interval, detail)


def repeated(count, interval):
    """The words of a repeat summary: "repeated 4,281 times in the last 10s"."""
    return "repeated {:,} times in the last {:g}s".format(count, interval)
