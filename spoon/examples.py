"""The echo server of the original README, ready to run.

``python -m spoon.examples [--port 30111] [--interface ::0]`` serves it in the foreground
(Ctrl-C stops it); ``twistd -n spoon --server spoon.examples.EchoServer`` runs it as a
daemon.
"""

import argparse
import logging

import spoon.server


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-P", "--port", type=int, default=30111)
    parser.add_argument("-I", "--interface", default="::0")
    parser.add_argument("--forked", action="store_true", help="pre-fork workers")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(process)d] %(name)s: %(message)s")
    klass = EchoServerForked if args.forked else EchoServer
    server = klass((args.interface, args.port))
    server.log.info("%s listening on %s", klass.__name__, server.server_address[:2])
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
