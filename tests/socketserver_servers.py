"""Server classes that override socketserver's hooks, for tests/test_socketserver.py.

``python -c "import socketserver_servers as s; s.main(NAME, PREFORK)"`` builds ``NAME`` on
127.0.0.1, port 0, prints ``READY <port> <pid>`` and serves until stopped.  Every hook
appends one line ``<pid> <hook> <client port>`` to the file named by ``$EVENTS``, from
whichever process runs it (the supervisor or a worker), so a test can read the order of
the hooks for each connection and the process each one ran in.
"""

import os
import socket
import sys

import spoon.server

#: Clients from this address are refused by ``verify_request`` (a loopback alias).
DENIED_HOST = "127.0.0.2"


def record(what, client_address=None):
    port = client_address[1] if isinstance(client_address, tuple) else "-"
    line = ("%d %s %s\n" % (os.getpid(), what, port)).encode()
    fd = os.open(os.environ["EVENTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


class Upper(spoon.server.Gulp):
    """Replies with the line upper-cased; ``boom`` raises; records that it was built."""

    def handle(self):
        record("handle", self.client_address)
        line = self.rfile.readline()
        if line.startswith(b"boom"):
            raise RuntimeError("handler failed on purpose")
        self.wfile.write(line.upper())


class HookedMixIn:
    """Overrides every socketserver hook to record it, then calls the stock one."""

    handler_klass = Upper

    def verify_request(self, request, client_address):
        record("verify", client_address)
        return client_address[0] != DENIED_HOST

    def process_request(self, request, client_address):
        record("process", client_address)
        super().process_request(request, client_address)

    def finish_request(self, request, client_address):
        record("finish", client_address)
        super().finish_request(request, client_address)

    def shutdown_request(self, request):
        record("shutdown", request.getpeername())
        super().shutdown_request(request)

    def close_request(self, request):
        record("close", request.getpeername())
        super().close_request(request)

    def handle_error(self, request, client_address):
        record("error", client_address)

    def server_bind(self):
        record("server_bind")
        super().server_bind()

    def server_activate(self):
        record("server_activate")
        super().server_activate()

    def service_actions(self):
        import time

        record("service_actions", ("when", "%.3f" % time.monotonic()))


class HookedSpoon(HookedMixIn, spoon.server.TCPSpoon):
    pass


class HookedSpork(HookedMixIn, spoon.server.TCPSpork):
    prefork = 2


class UDPUpper(spoon.server.UDPGulp):
    """Replies with the datagram's length and its first bytes upper-cased."""

    def handle(self):
        data = self.rfile.read()
        record("handle", self.client_address)
        self.wfile.write(b"%d %s" % (len(data), data[:16].upper()))


class UDPHookedMixIn:
    handler_klass = UDPUpper
    max_packet_size = 100

    def verify_request(self, request, client_address):
        record("verify", client_address)
        return client_address[0] != DENIED_HOST


class UDPHookedSpoon(UDPHookedMixIn, spoon.server.UDPSpoon):
    pass


class UDPHookedSpork(UDPHookedMixIn, spoon.server.UDPSpork):
    prefork = 2


def main(name, poll_interval="0.1"):
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(process)d %(name)s %(levelname)s: %(message)s")
    klass = globals()[name]
    server = klass(("127.0.0.1", 0))
    print("READY", server.server_address[1], os.getpid(), flush=True)
    server.serve_forever(float(poll_interval))
    server.server_close()
