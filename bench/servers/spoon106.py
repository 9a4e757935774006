"""The original spoon (1.0.6, installed in its own virtual environment): its TCPSpork
with ``--workers`` pre-forked processes (or its TCPSpoon with ``--workers 1``)."""

import argparse
import logging

from handlers import make_handlers, ready
from spoon.server import TCPGulp, TCPSpoon, TCPSpork


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--handler", default="echo")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    class Server(TCPSpork if args.workers > 1 else TCPSpoon):
        handler_klass = make_handlers(TCPGulp)[args.handler]
        prefork = args.workers
        request_queue_size = 1024  # the same listen backlog as every other peer

    server = Server(("127.0.0.1", 0))
    ready(server.server_address[1])
    server.serve_forever()


if __name__ == "__main__":
    main()
