"""Server classes behind a PROXY protocol sender (HAProxy or a test), run in real child
processes by tests/test_haproxy.py and tests/test_proxy_server.py."""

import os

from twisted.internet import task

import spoon.server


class Who(spoon.server.Gulp):
    """One line in, one line out: ``INSTANCE WORKER-PID CLIENT-HOST CLIENT-PORT LINE``, where
    INSTANCE is the environment's ``SPOON_INSTANCE`` and CLIENT is what ``client_address``
    says.  ``health`` (HAProxy's check) gets ``ok``; a line starting with ``slow`` is
    answered after 0.1s (the handler waits on a Deferred), so requests are in flight."""

    timeout = 10

    def handle(self):
        line = self.rfile.readline().strip()
        if line == b"health":
            self.wfile.write(b"ok\n")
            return
        if line.startswith(b"slow"):
            from twisted.internet import reactor

            self.wait(task.deferLater(reactor, 0.1, lambda: None))
        host, port = self.client_address[0], self.client_address[1]
        self.wfile.write(
            b"%s %d %s %d %s\n"
            % (os.environ.get("SPOON_INSTANCE", "-").encode(), os.getpid(), host.encode(), port, line)
        )


class WhoSpork(spoon.server.TCPSpork):
    """Two workers behind a load balancer on this host (the default allow-list)."""

    server_logger = "who"
    handler_klass = Who
    proxy_protocol = True
    prefork = 2
    graceful_timeout = 10


class WhoFromOneAddress(WhoSpork):
    """Takes the header from 127.0.0.1 only (so 127.0.0.2 is "elsewhere")."""

    proxy_allow_from = ["127.0.0.1/32"]


class WhoSpoon(WhoFromOneAddress, spoon.server.TCPSpoon):
    """The same in one process (no pre-forking)."""

    prefork = 1


class WhoPlain(spoon.server.TCPSpork):
    """No PROXY protocol of its own: a "haproxy:tcp:..." endpoint turns it on."""

    server_logger = "who"
    handler_klass = Who
    prefork = 2
