"""gevent's StreamServer pre-forked after binding: the usual way to run blocking-style
handlers on an event loop.  The master binds, forks ``--workers`` children, and each child
imports gevent (after the fork, so no loop is shared) and serves the inherited socket."""

import argparse
import os
import signal
import socket

from handlers import big_transfer, burn, ready


def handlers():
    def echo(sock, address):
        rfile = sock.makefile("rb")
        request = rfile.readline().decode("utf8")
        sock.sendall(request.lower().encode("utf8"))

    def pingpong(sock, address):
        rfile = sock.makefile("rb")
        for line in rfile:
            sock.sendall(line.decode("utf8").lower().encode("utf8"))

    def cpu(sock, address):
        rfile = sock.makefile("rb")
        rfile.readline()
        burn()
        sock.sendall(b"%d\n" % os.getpid())

    def big(sock, address):
        big_transfer(sock.makefile("rb"), sock.sendall)

    return {"echo": echo, "pingpong": pingpong, "cpu": cpu, "big": big}


def closing(handle):
    """Close the connection when the handler returns, as socketserver does."""

    def run(sock, address):
        try:
            handle(sock, address)
        finally:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            sock.close()

    return run


def worker(listener, handler):
    from gevent import socket as gsocket
    from gevent.server import StreamServer

    sock = gsocket.socket(listener.family, listener.type, fileno=listener.detach())
    StreamServer(sock, closing(handlers()[handler])).serve_forever()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--handler", default="echo")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    pids = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            try:
                worker(listener, args.handler)
            finally:
                os._exit(0)
        pids.append(pid)
    ready(listener.getsockname()[1])
    signal.signal(signal.SIGTERM, lambda *a: [os.kill(p, signal.SIGTERM) for p in pids])
    for pid in pids:
        os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
