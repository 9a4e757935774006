"""Pool server classes for the pool fault tests (tests/test_pool_faults.py,
tests/test_prefork_halt.py, tests/test_prefork_retire.py) and bench/soak.py.

``python -c "import pool_fault_servers as s; s.main(NAME)"`` builds ``NAME`` on 127.0.0.1,
port 0 (``PORT`` in the environment to choose one), logs one line per record to stdout (or
to the file ``POOL_LOG``),
prints ``READY <port> <pid>`` and supervises its pool until stopped, then ``RETURNED``.

Every handler answers one line ``"<pid> <generation>\\n"`` per request line: the worker that
served it and the configuration generation it had (``load_config()`` calls).
"""

import logging
import os
import sys

import spoon.server


class Answers(spoon.server.Gulp):
    """One request per line until EOF: answers ``"<pid> <generation>"``; ``"slow"`` waits
    half a second first (a request in flight), ``"hold"`` waits for one more byte
    (mid-request: a graceful stop must wait for it)."""

    def handle(self):
        for line in self.rfile:
            word = line.strip()
            if word == b"slow":
                self.wait_seconds(0.5)
            elif word == b"hold":
                self.rfile.read(1)
            self.wfile.write(b"%d %d\n" % (os.getpid(), self.server.generation))
            self.wfile.flush()
            self.server.after_request()

    def wait_seconds(self, seconds):
        from twisted.internet import task

        self.wait(task.deferLater(self.server._reactor, seconds, lambda: None))


class AnswersPool(spoon.server.TCPSpork):
    server_logger = "pool-faults"
    handler_klass = Answers
    prefork = 2
    graceful_timeout = 10
    generation = 0

    def load_config(self):
        """The generation is the number in the file ``POOL_CONFIG`` (as a real server
        reads its configuration file), else a count of the calls."""
        path = os.environ.get("POOL_CONFIG")
        if path:
            with open(path) as f:
                self.generation = int(f.read())
        else:
            self.generation += 1
        self.log.info("generation %d", self.generation)

    def after_request(self):
        pass


class BrokenWorkers(AnswersPool):
    """Imports what does not exist once it is a worker (as a worker after a user switch
    that cannot read the checkout): the pool cannot serve."""

    def became_worker(self, number):
        super().became_worker(number)
        import no_such_module_for_workers  # noqa: F401


#: Bytes each request of :class:`LeakyPool` keeps forever.
LEAK = 100 * 1024
_leaked = []


class LeakyPool(AnswersPool):
    """Leaks 100 KiB per request; replaced once resident memory passes 20 MiB over what
    a worker starts with."""

    max_worker_memory = None  # set by main() from the supervisor's size

    def after_request(self):
        _leaked.append(bytearray(os.urandom(16)) * (LEAK // 16))


class RecycledPool(AnswersPool):
    max_requests = 50
    max_requests_jitter = 5


class RaisesMemoryError(Answers):
    def handle(self):
        line = self.rfile.readline()
        self.wfile.write(b"%d %d\n" % (os.getpid(), self.server.generation))
        if line.strip() == b"oom":
            self.wfile.flush()
            raise MemoryError()


class OutOfMemoryPool(AnswersPool):
    handler_klass = RaisesMemoryError


class StuckPool(AnswersPool):
    """A short grace period, for a handler stuck mid-request."""

    graceful_timeout = 2


def main(name):
    # POOL_LOG: a file (a test that does not read the output as it comes must not let the
    # pipe fill up and block the pool's processes); else stdout.
    target = {"filename": os.environ["POOL_LOG"]} if os.environ.get("POOL_LOG") else {"stream": sys.stdout}
    logging.basicConfig(
        **target,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s",
    )
    klass = globals()[name]
    if klass is LeakyPool:
        from spoon.linux import resident_bytes

        klass.max_worker_memory = resident_bytes() + 20 * 1024 * 1024
    for key in ("prefork", "graceful_timeout", "worker_timeout"):
        value = os.environ.get("POOL_" + key.upper())
        if value:
            setattr(klass, key, type(getattr(klass, key) or 0)(value))
    server = klass(("127.0.0.1", int(os.environ.get("PORT", "0"))))
    print("READY %d %d" % (server.server_address[1], os.getpid()), flush=True)
    try:
        server.serve_forever()
    finally:
        print("RETURNED", flush=True)
