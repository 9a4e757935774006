"""When a pool worker should make way for a fresh one: after ``max_requests`` requests
(plus a per-worker jitter), once its resident memory passes ``max_worker_memory`` (checked
between requests), or after a MemoryError escaped a handler (a process short of memory
keeps failing requests while its heartbeat still beats).

The worker does not stop by itself: it asks the supervisor once, through its heartbeat
pipe, and keeps serving until its successor serves; the supervisor then stops it
gracefully, as in a HUP replacement, so no connection is refused meanwhile.
"""

import logging
import os
import random

from spoon import linux

__all__ = ["RetirePolicy"]

log = logging.getLogger("spoon.worker")


class RetirePolicy:
    """Counts requests and watches memory in one worker; calls ``ask_replacement()`` once
    when the worker should be replaced."""

    def __init__(self, ask_replacement, max_requests=0, jitter=0, max_memory=0, rss=linux.resident_bytes):
        self.ask_replacement = ask_replacement
        self.limit = int(max_requests or 0)
        if self.limit and jitter:
            self.limit += random.randint(0, int(jitter))
        self.max_memory = int(max_memory or 0)
        self.rss = rss
        self.served = 0
        self.asked = False

    @classmethod
    def of(cls, target, ask_replacement):
        """The policy of ``target`` (an ``IRequestCounting``)."""
        return cls(
            ask_replacement,
            getattr(target, "max_requests", 0),
            getattr(target, "max_requests_jitter", 0),
            getattr(target, "max_worker_memory", 0),
        )

    @property
    def active(self):
        return bool(self.limit or self.max_memory)

    def watch(self, target):
        """Have ``target`` report its requests here (MemoryError is always watched)."""
        target.watch_requests(self.request_ended)

    def request_ended(self, exc):
        if self.asked:
            return
        self.served += 1
        if isinstance(exc, MemoryError):
            self._retire("a MemoryError escaped a handler")
        elif self.limit and self.served >= self.limit:
            self._retire("served %d requests (max_requests)" % self.served)
        elif self.max_memory:
            rss = self.rss()
            if rss > self.max_memory:
                self._retire(
                    "resident memory %d KiB > max_worker_memory %d KiB"
                    % (rss // 1024, self.max_memory // 1024)
                )

    def _retire(self, why):
        self.asked = True
        log.info("Worker %d: %s; asking to be replaced", os.getpid(), why)
        self.ask_replacement()
