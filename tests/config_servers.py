"""Server classes the configuration tests name by dotted path (``config_servers.X``).

Importing it has no side effect: it holds no tests.
"""

import spoon.server


class Echo(spoon.server.Gulp):
    def handle(self):
        self.wfile.write(self.rfile.readline())


class UDPEcho(spoon.server.UDPGulp):
    def handle(self):
        self.wfile.write(self.rfile.read())


class DefaultsSpork(spoon.server.TCPSpork):
    """Every class-level source set: command_line_defaults, prefork, the timeouts."""

    handler_klass = Echo
    prefork = 3
    graceful_timeout = 7
    worker_timeout = 11
    command_line_defaults = dict(
        spoon.server.TCPSpork.command_line_defaults,
        port=4321,
        interface="127.0.0.1",
        pid_file="/tmp/defaults-spork.pid",
    )


class SporkFromDefaults(DefaultsSpork):
    """command_line_defaults["spork"] wins over prefork, as in the original."""

    command_line_defaults = dict(DefaultsSpork.command_line_defaults, spork=5)


class PlainSpoon(spoon.server.TCPSpoon):
    handler_klass = Echo


class UDPServer(spoon.server.UDPSpoon):
    handler_klass = UDPEcho


class NoGulp(spoon.server.TCPSpoon):
    handler_klass = object


class NoHandler(spoon.server.TCPSpoon):
    """The stock handler_klass: a Gulp without a handle() of its own."""


class BadDefaults(spoon.server.TCPSpoon):
    handler_klass = Echo
    command_line_defaults = dict(spoon.server.TCPSpoon.command_line_defaults, port=99999)


class NotAServer:
    pass


def make_factory():
    """A callable the pool's supervisor accepts as a target (not a server class)."""
    from twisted.internet.protocol import Factory

    return Factory()
