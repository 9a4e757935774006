"""Endpoint strings that name a plain socket, and binding them.

A pre-forked pool needs its listening socket bound by the parent (before privileges are
dropped) and handed down as a descriptor, so only endpoint types that are a plain socket
can be pre-forked: ``tcp``, ``tcp6``, ``udp``, ``udp6``.  Their descriptions are parsed here
with the same syntax as Twisted's ``serverFromString``.
"""

import socket

__all__ = ["SocketSpec", "parse_socket_endpoint", "bind_socket", "format_address", "socket_options"]

#: Twisted endpoint types that name a plain socket this module can bind (and hand down).
SOCKET_ENDPOINT_TYPES = ("tcp", "tcp6", "udp", "udp6")


class SocketSpec:
    """What to bind: ``kind`` ("tcp" or "udp"), ``host``, ``port``, ``backlog`` (None: the
    server class decides); ``proxy``: connections start with a PROXY protocol header
    (a "haproxy:tcp:..." endpoint)."""

    def __init__(self, kind, host, port, backlog=None, proxy=False):
        self.kind = kind
        self.host = host
        self.port = port
        self.backlog = backlog
        self.proxy = proxy

    @property
    def datagram(self):
        return self.kind == "udp"

    def __repr__(self):
        return "SocketSpec(%r, %r, %r, backlog=%r, proxy=%r)" % (
            self.kind, self.host, self.port, self.backlog, self.proxy
        )


def _split_description(description):
    """Split a Twisted endpoint string on unescaped colons ("tcp:80:interface=\\:\\:1")."""
    parts, current, escaped = [], [], False
    for char in description:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def parse_socket_endpoint(description):
    """A :class:`SocketSpec` for "tcp:", "tcp6:" and "udp:" endpoint strings (the ones that
    name a socket this process can bind and hand to a supervisor); None for any other type.

    "haproxy:" in front of a tcp: or tcp6: endpoint (Twisted's syntax) gives the same
    socket with ``proxy`` set: its connections start with a PROXY protocol header, which
    spoon servers read themselves (:mod:`spoon.proxy`).

    Raises ValueError for a malformed socket endpoint.
    """
    kind, sep, inner = description.partition(":")
    if sep and kind.strip().lower() == "haproxy":
        spec = parse_socket_endpoint(inner)
        if spec is None or spec.datagram or spec.proxy:
            raise ValueError(
                "endpoint %r: spoon serves the PROXY protocol on tcp: and tcp6: endpoints "
                "only (or set proxy_protocol = True on the server class)" % description
            )
        spec.proxy = True
        return spec
    parts = _split_description(description)
    kind = parts[0].strip().lower()
    if len(parts) == 1 and kind.isdigit():  # Twisted's old "8080" shorthand
        kind, parts = "tcp", ["tcp", parts[0]]
    if kind not in SOCKET_ENDPOINT_TYPES:
        return None
    positional, keywords = [], {}
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if sep:
            keywords[key.strip()] = value
        else:
            positional.append(part)
    names = ["port", "interface", "backlog"]
    for name, value in zip(names, positional):
        keywords.setdefault(name, value)
    if len(positional) > len(names):
        raise ValueError("too many arguments in endpoint %r" % description)
    unknown = set(keywords) - set(names)
    if unknown:
        raise ValueError("unknown option(s) %s in endpoint %r" % (", ".join(sorted(unknown)), description))
    try:
        port = int(keywords["port"])
    except (KeyError, ValueError):
        raise ValueError("endpoint %r needs a numeric port" % description) from None
    default_host = "::" if kind.endswith("6") else "0.0.0.0"
    host = keywords.get("interface") or default_host
    backlog = keywords.get("backlog")
    try:
        backlog = int(backlog) if backlog is not None else None
    except ValueError:
        raise ValueError("endpoint %r: backlog must be a number" % description) from None
    return SocketSpec(kind.rstrip("6"), host, port, backlog)


def bind_socket(spec, ipv6_only=False, reuse_address=True, backlog=1024):
    """Bind (and for TCP, listen on) the socket ``spec`` describes, as a spoon server would:
    IPv6 when the host contains ":", dual-stack unless ``ipv6_only``."""
    family = socket.AF_INET6 if ":" in spec.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM if spec.datagram else socket.SOCK_STREAM)
    try:
        if reuse_address:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if ipv6_only else 0)
        sock.bind((spec.host, spec.port))
        if not spec.datagram:
            sock.listen(spec.backlog if spec.backlog is not None else backlog)
    except OSError as e:
        sock.close()
        where = format_address((spec.host, spec.port))
        raise OSError(e.errno, "cannot bind %s %s: %s" % (spec.kind, where, e.strerror)) from e
    sock.setblocking(False)
    return sock


def format_address(address):
    """"host:port" ("[v6host]:port"), as log lines and tests read it."""
    host, port = address[0], address[1]
    return "[%s]:%s" % (host, port) if ":" in str(host) else "%s:%s" % (host, port)


def socket_options(klass):
    """Binding options a spoon server class declares (defaults for anything else)."""
    return {
        "ipv6_only": bool(getattr(klass, "ipv6_only", False)),
        "reuse_address": bool(getattr(klass, "allow_reuse_address", True)),
        "backlog": int(getattr(klass, "request_queue_size", 1024)),
    }
