"""Server classes for the fault tests (tests/test_faults.py).

``python -c "import fault_servers; fault_servers.main(NAME)"`` builds ``NAME`` on
127.0.0.1, port 0, logs to stdout in one line per record, prints ``READY <port> <pid>``
and serves until stopped, then prints ``RETURNED``.
"""

import logging
import os
import sys

import spoon.server


class ReadsToEnd(spoon.server.Gulp):
    """Reads the whole message (to EOF), then says it processed it."""

    def handle(self):
        data = self.rfile.read()
        print("PROCESSED %d" % len(data), flush=True)
        self.wfile.write(b"processed %d\n" % len(data))


class ReadsToEndServer(spoon.server.TCPSpoon):
    server_logger = "faults"
    handler_klass = ReadsToEnd


class Raises(spoon.server.Gulp):
    def handle(self):
        self.rfile.readline()
        raise RuntimeError("handler bug hit on purpose")


class RaisesServer(spoon.server.TCPSpoon):
    server_logger = "faults"
    handler_klass = Raises


class Lower(spoon.server.Gulp):
    """The README's handler: decoding invalid UTF-8 raises in it."""

    def handle(self):
        request = self.rfile.readline().decode("utf8")
        self.wfile.write(request.lower().encode("utf8"))


class LowerServer(spoon.server.TCPSpoon):
    server_logger = "faults"
    handler_klass = Lower


class Impatient(Lower):
    timeout = 0.2


class ImpatientServer(spoon.server.TCPSpoon):
    server_logger = "faults"
    handler_klass = Impatient


class Session(spoon.server.Gulp):
    """A persistent protocol: a reply per line until the client (or a stop) ends it."""

    def handle(self):
        for line in self.rfile:
            self.wfile.write(b"ok " + line)
        self.wfile.write(b"bye stopping=%d\n" % self.server.stopping)


class SessionServer(spoon.server.TCPSpoon):
    server_logger = "faults"
    handler_klass = Session
    graceful_timeout = 30


class SessionPool(SessionServer, spoon.server.TCPSpork):
    prefork = 2


def main(name):
    limit = os.environ.get("FD_LIMIT")
    if limit:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (int(limit), int(limit)))
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stdout,
        format="%(process)d %(name)s %(levelname)s: %(message)s",
    )
    server = globals()[name](("127.0.0.1", 0))
    print("READY", server.server_address[1], os.getpid(), flush=True)
    server.serve_forever()
    print("RETURNED", flush=True)
