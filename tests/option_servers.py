"""Server classes ``tests/test_options_everywhere.py`` names by dotted path
(``option_servers.X``): their answers show what the entry point's options did.

Importing it has no side effect: it holds no tests.
"""

import json
import logging
import os
import sys
import time

import spoon.server

_debug = logging.getLogger("option-probe.debug")


class Facts(spoon.server.Gulp):
    """"facts": one JSON line on the serving process; "stuck": block the reactor (a
    handler in a CPU loop or a blocking call), for the worker timeout."""

    def handle(self):
        word = self.rfile.readline().strip()
        self.server.log.info("handled %s", word.decode())
        _debug.debug("probe debug record")
        if word == b"stuck":
            time.sleep(60)
        reactor = sys.modules.get("twisted.internet.reactor")
        facts = {
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "uid": os.getuid(),
            "gid": os.getgid(),
            "nice": os.getpriority(os.PRIO_PROCESS, 0),
            "reactor": type(reactor).__module__ if reactor is not None else None,
            "graceful_timeout": self.server.graceful_timeout,
            "prefork": getattr(self.server, "prefork", None),
            "max_requests": getattr(self.server, "max_requests", None),
            "max_requests_jitter": getattr(self.server, "max_requests_jitter", None),
            "max_worker_memory": getattr(self.server, "max_worker_memory", None),
            "proxy_allow_from": list(getattr(self.server, "proxy_allow_from", ())),
            # What socketserver gives a handler (a UNIX socket: '' and the path).
            "client_address": self.client_address,
            "sockname": self.request.getsockname(),
        }
        self.wfile.write(json.dumps(facts).encode() + b"\n")


class OptionProbe(spoon.server.TCPSpoon):
    server_logger = "option-probe"
    handler_klass = Facts
    graceful_timeout = 3
    command_line_defaults = dict(spoon.server.TCPSpoon.command_line_defaults,
                                 interface="127.0.0.1")


class NoHandler(spoon.server.TCPSpoon):
    """The stock handler_klass: a Gulp without handle()."""


class BadPort(OptionProbe):
    command_line_defaults = dict(OptionProbe.command_line_defaults, port=70000)


class OptionPool(OptionProbe, spoon.server.TCPSpork):
    """A pool whose class says 4 workers (and OptionProbe's graceful_timeout, 3 s)."""

    prefork = 4
