"""stdlib socketserver peers: ``--kind single`` (TCPServer), ``forking``
(ForkingTCPServer: a process per connection, at most ``max_children`` = 40 at a time, its
default) or ``threading`` (ThreadingTCPServer: a thread per connection)."""

import argparse
import socketserver

from handlers import make_handlers, ready

KINDS = {
    "single": socketserver.TCPServer,
    "forking": socketserver.ForkingTCPServer,
    "threading": socketserver.ThreadingTCPServer,
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--kind", choices=sorted(KINDS), default="single")
    p.add_argument("--handler", default="echo")
    args = p.parse_args()

    class Server(KINDS[args.kind]):
        allow_reuse_address = True
        request_queue_size = 1024  # the same listen backlog as every other peer
        daemon_threads = True

    server = Server(("127.0.0.1", 0), make_handlers(socketserver.StreamRequestHandler)[args.handler])
    ready(server.server_address[1])
    server.serve_forever()


if __name__ == "__main__":
    main()
