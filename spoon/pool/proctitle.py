"""Process titles, so that ``ps`` tells the supervisor from its workers:
``spoon: supervisor myapp.Server [tcp:30111]`` and ``spoon: worker 2 myapp.Server``.

``setproctitle`` is optional (the ``proctitle`` extra); without it titles are not set.
"""

import socket

__all__ = ["supervisor_title", "worker_title", "set_title"]


def socket_text(sock):
    """``tcp:PORT`` / ``udp:PORT`` (with ``:interface=HOST`` unless bound to every
    address), in the endpoint syntax an operator typed."""
    if sock is None:
        return "?"
    try:
        name = sock.getsockname()
    except OSError:
        return "?"
    if sock.family == socket.AF_UNIX:
        return "unix:%s" % (name or "?")
    kind = "udp" if sock.type == socket.SOCK_DGRAM else "tcp"
    host, port = name[0], name[1]
    if host in ("0.0.0.0", "::"):
        return "%s:%d" % (kind, port)
    return "%s:%d:interface=%s" % (kind, port, host)


def supervisor_title(name, sock):
    return "spoon: supervisor %s [%s]" % (name, socket_text(sock))


def worker_title(number, name):
    return "spoon: worker %d %s" % (number, name)


def set_title(title):
    """Set this process's title; False when ``setproctitle`` is not installed."""
    try:
        from setproctitle import setproctitle
    except ImportError:
        return False
    setproctitle(title)
    return True
