"""The echo server of the original README, ready to run.

``python -m spoon.examples [--port 30111] [--interface ::0] [-s N] [--log-format json]``
serves it in the foreground (Ctrl-C stops it); ``twistd -n spoon --server spoon.examples.EchoServer`` runs it as a
daemon.
"""

import argparse
import sys

import spoon.server
from spoon import config, logs


class RequestHandler(spoon.server.Gulp):
    """Read one line and send it back lower-cased."""

    def handle(self):
        request = self.rfile.readline().decode("utf8")
        response = request.lower().encode("utf8")
        self.wfile.write(response)


class EchoServer(spoon.server.TCPSpoon):
    server_logger = "my-echo-server"
    handler_klass = RequestHandler
    command_line_defaults = dict(spoon.server.TCPSpoon.command_line_defaults, port=30111)


class EchoServerForked(EchoServer, spoon.server.TCPSpork):
    prefork = 2


def main(argv=None):
    """``python -m spoon.examples``: the echo server in the foreground, configured like every
    entry point (options, ``SPOON_*`` variables, ``--config``; see :mod:`spoon.config`)."""
    parser = argparse.ArgumentParser(prog="python -m spoon.examples", description=__doc__.splitlines()[0])
    parser.add_argument("--forked", action="store_true",
                        help="serve EchoServerForked (pre-forked, 2 workers unless -s says otherwise)")
    config.add_arguments(parser, "examples")
    args = parser.parse_args(argv)
    settings = config.from_arguments(args, "examples", server_class=EchoServerForked if args.forked else EchoServer)
    if not args.forked and settings.workers > 1:
        settings = config.from_arguments(args, "examples", server_class=EchoServerForked)
    status = config.check_and_print(settings)
    if status is not None:
        return status
    if settings.errors:
        parser.error("\n".join(settings.errors))
    logs.configure(settings)
    klass = settings.server_class
    server = klass((settings.interface, settings.port))
    if settings.workers > 1:
        server.prefork = settings.workers
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    # Run the module's importable copy, so that the classes are named spoon.examples.*
    # (in messages, --print-config, and for the pool's workers), not __main__.*.
    from spoon.examples import main as importable_main

    sys.exit(importable_main())
