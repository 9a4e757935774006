"""A raw Twisted protocol doing the handlers' work: the ceiling of our line adapter.

Run alone (``python twisted_raw.py --handler echo``: one process, one reactor) or
pre-forked by our supervisor, which imports the factory callables below
(``python -m spoon.prefork --fd FD --target twisted_raw.echo_factory --workers 2``).
"""

import argparse
import os
import sys

from twisted.internet.interfaces import IHalfCloseableProtocol, IPullProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.basic import LineOnlyReceiver
from zope.interface import implementer

from handlers import CHUNK, burn, ready


@implementer(IHalfCloseableProtocol)
class Echo(Protocol):
    """The README's handler: one line (or what came before EOF) back lower-cased, close."""

    done = False

    def __init__(self):
        self.buf = b""

    def dataReceived(self, data):
        self.buf += data
        i = self.buf.find(b"\n")
        if i >= 0:
            self.reply(self.buf[: i + 1])

    def reply(self, request):
        if self.done:
            return
        self.done = True
        self.transport.write(request.decode("utf8").lower().encode("utf8"))
        self.transport.loseConnection()

    def readConnectionLost(self):
        self.reply(self.buf)

    def writeConnectionLost(self):
        pass


class PingPong(LineOnlyReceiver):
    """Persistent connection: every line back lower-cased."""

    delimiter = b"\n"
    MAX_LENGTH = 65536

    def lineReceived(self, line):
        self.transport.write(line.decode("utf8").lower().encode("utf8") + b"\n")


@implementer(IHalfCloseableProtocol)
class Cpu(Protocol):
    """Burn 20 ms of CPU per request, reply with the worker's pid."""

    def __init__(self):
        self.buf = b""

    def dataReceived(self, data):
        self.buf += data
        if b"\n" in self.buf:
            burn()
            self.transport.write(b"%d\n" % os.getpid())
            self.transport.loseConnection()

    def readConnectionLost(self):
        pass

    def writeConnectionLost(self):
        pass


@implementer(IPullProducer, IHalfCloseableProtocol)
class Big(Protocol):
    """``BIG in out``: count ``in`` bytes of body, then produce ``out`` bytes."""

    def __init__(self):
        self.head = b""
        self.left_in = None
        self.left_out = 0
        self.block = b"y" * CHUNK

    def dataReceived(self, data):
        if self.left_in is None:
            self.head += data
            if b"\n" not in self.head:
                return
            line, data = self.head.split(b"\n", 1)
            words = line.split()
            self.left_in, self.left_out = int(words[1]), int(words[2])
            self.head = None
        self.left_in -= len(data)
        if self.left_in <= 0 and self.left_out is not None:
            self.transport.registerProducer(self, False)

    def resumeProducing(self):
        n = min(self.left_out, CHUNK)
        self.transport.write(self.block if n == CHUNK else self.block[:n])
        self.left_out -= n
        if self.left_out <= 0:
            self.left_out = None
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def stopProducing(self):
        self.left_out = None

    def readConnectionLost(self):
        pass

    def writeConnectionLost(self):
        pass


PROTOCOLS = {"echo": Echo, "pingpong": PingPong, "cpu": Cpu, "big": Big}


def _factory(name):
    f = Factory()
    f.protocol = PROTOCOLS[name]
    f.noisy = False
    return f


def echo_factory():
    return _factory("echo")


def pingpong_factory():
    return _factory("pingpong")


def cpu_factory():
    return _factory("cpu")


def big_factory():
    return _factory("big")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--handler", default="echo")
    args = p.parse_args()
    from twisted.internet import reactor

    port = reactor.listenTCP(0, _factory(args.handler), backlog=1024, interface="127.0.0.1")
    ready(port.getHost().port)
    reactor.run()


if __name__ == "__main__":
    sys.exit(main())
