"""Server classes the functional tests run in real child processes.

``python tests/sample_servers.py NAME [HOST]`` builds ``NAME`` on HOST (default 127.0.0.1),
port 0, prints ``READY <port> <pid>`` and serves until stopped, then prints ``RETURNED``.
"""

import logging
import os
import sys

from twisted.internet import defer, task

import spoon.server


def _later(seconds, value=None):
    from twisted.internet import reactor

    return task.deferLater(reactor, seconds, lambda: value)


class Lower(spoon.server.Gulp):
    def handle(self):
        request = self.rfile.readline().decode("utf8")
        self.wfile.write(request.lower().encode("utf8"))


class EchoServer(spoon.server.TCPSpoon):
    server_logger = "sample-echo"
    handler_klass = Lower


class SlowReply(spoon.server.Gulp):
    """Says it started, waits ``delay`` seconds (a line of input gives it), replies."""

    def handle(self):
        delay = float(self.rfile.readline())
        self.wfile.write(b"started\n")
        self.wait(_later(delay))
        self.wfile.write(b"finished\n")


class SlowServer(spoon.server.TCPSpoon):
    server_logger = "sample-slow"
    handler_klass = SlowReply
    graceful_timeout = 2


class Generation(spoon.server.Gulp):
    def handle(self):
        self.rfile.readline()
        self.wfile.write(b"%d %d\n" % (self.server.generation, os.getpid()))


class ReloadServer(spoon.server.TCPSpoon):
    """load_config counts generations; FAIL_RELOAD_AT makes that generation raise."""

    server_logger = "sample-reload"
    handler_klass = Generation
    generation = 0

    def load_config(self):
        if self.generation + 1 == int(os.environ.get("FAIL_RELOAD_AT", "0")):
            os.environ["FAIL_RELOAD_AT"] = "0"
            raise ValueError("bad config file")
        self.generation += 1


class Crashy(spoon.server.Gulp):
    def handle(self):
        line = self.rfile.readline()
        if line.startswith(b"crash"):
            raise RuntimeError("handler crashed on purpose")
        self.wfile.write(b"ok\n")


class CrashyServer(spoon.server.TCPSpoon):
    server_logger = "sample-crashy"
    handler_klass = Crashy


class NeverReads(spoon.server.Gulp):
    """Never reads its input: parks on a Deferred that never fires."""

    def handle(self):
        self.wfile.write(b"parked\n")
        self.wait(defer.Deferred())


class NeverReadsServer(spoon.server.TCPSpoon):
    handler_klass = NeverReads


class Firehose(spoon.server.Gulp):
    """Writes 200 MiB, 1 MiB at a time, from one preallocated block."""

    block = b"f" * (1024 * 1024)

    def handle(self):
        for _ in range(200):
            self.wfile.write(self.block)


class FirehoseServer(spoon.server.TCPSpoon):
    handler_klass = Firehose


class UDPLower(spoon.server.UDPGulp):
    def handle(self):
        self.wfile.write(self.rfile.read().lower())


class UDPEchoServer(spoon.server.UDPSpoon):
    server_logger = "sample-udp"
    handler_klass = UDPLower


class StopOnRequest(spoon.server.Gulp):
    """``stop``: shutdown() from another thread, which returns once serving ended."""

    def handle(self):
        import threading

        line = self.rfile.readline()
        if line == b"stop\n":
            def stopper():
                self.server.shutdown()
                print("SHUTDOWN RETURNED", flush=True)

            threading.Thread(target=stopper).start()
        self.wfile.write(b"round %d\n" % self.server.rounds)


class TwiceServer(spoon.server.TCPSpoon):
    handler_klass = StopOnRequest
    rounds = 1


def main(name, host="127.0.0.1"):
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stdout,
        format="%(asctime)s [%(process)d] %(name)s %(levelname)s: %(message)s",
    )
    klass = globals()[name]
    server = klass((host, 0))
    print("READY", server.server_address[1], os.getpid(), flush=True)
    server.serve_forever()
    print("RETURNED", flush=True)
    if isinstance(server, TwiceServer):
        server.rounds += 1
        server.serve_forever()
        print("RETURNED AGAIN", flush=True)
    server.server_close()


if __name__ == "__main__":
    main(*sys.argv[1:])
