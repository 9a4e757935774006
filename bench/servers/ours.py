"""Our servers for the bench: ``--kind spoon`` (TCPSpoon, one process) or ``--kind spork``
(TCPSpork, ``--workers`` pre-forked processes), serving a handler of handlers.py."""

import argparse
import logging
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository: our spoon

from handlers import make_handlers, ready  # noqa: E402
from spoon.server import Gulp, TCPSpoon, TCPSpork  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--kind", choices=["spoon", "spork"], default="spoon")
    p.add_argument("--handler", default="echo")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--client-speaks-first", action="store_true",
                   help="the server class's client_speaks_first opt-in (TCP_DEFER_ACCEPT)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base = TCPSpork if args.kind == "spork" else TCPSpoon

    class Server(base):
        handler_klass = make_handlers(Gulp)[args.handler]
        prefork = args.workers
        client_speaks_first = args.client_speaks_first

    server = Server(("127.0.0.1", 0))
    ready(server.server_address[1])
    server.serve_forever()


if __name__ == "__main__":
    main()
