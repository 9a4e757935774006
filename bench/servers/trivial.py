"""Fallback for the generator-ceiling server when no C compiler is present: the leanest
Python epoll loop (echo lower-cased, close on EOF).  Prints ``READY <port>``."""

import select
import socket
import sys
import time


def main():
    lifetime = float(sys.argv[1]) if len(sys.argv) > 1 else 120.0
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", 0))
    ls.listen(4096)
    ls.setblocking(False)
    print("READY %d" % ls.getsockname()[1], flush=True)
    ep = select.epoll()
    ep.register(ls.fileno(), select.EPOLLIN)
    conns = {}
    end = time.monotonic() + lifetime
    while time.monotonic() < end:
        for fd, ev in ep.poll(1.0):
            if fd == ls.fileno():
                while True:
                    try:
                        c, _ = ls.accept()
                    except BlockingIOError:
                        break
                    c.setblocking(False)
                    conns[c.fileno()] = c
                    ep.register(c.fileno(), select.EPOLLIN)
                continue
            c = conns[fd]
            try:
                data = c.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                c.send(data.lower())
            else:
                ep.unregister(fd)
                del conns[fd]
                c.close()


if __name__ == "__main__":
    main()
