"""Endpoint strings that name a plain socket, and binding them.

A pre-forked pool needs its listening socket bound by the parent (before privileges are
dropped) and handed down as a descriptor, so it serves the endpoint types that are a plain
socket: ``tcp``, ``tcp6``, ``udp``, ``udp6``, ``unix`` (a UNIX stream socket: bound once,
shared like a TCP one), ``ssl`` (a TCP socket whose every process speaks TLS, see
:mod:`spoon.tls`) and ``systemd`` (a socket systemd bound and passed:
``LISTEN_FDS``/``LISTEN_PID``, chosen by position, ``index=``, or by the socket unit's
``FileDescriptorName=``, ``name=``).  Their descriptions are parsed here with the same
syntax as Twisted's ``serverFromString``.
"""

import dataclasses
import os
import socket
import stat

from spoon.pool import upgrade

__all__ = [
    "SocketSpec",
    "parse_socket_endpoint",
    "bind_socket",
    "format_address",
    "socket_options",
    "set_defer_accept",
]

#: Twisted endpoint types that name a plain socket this module can bind (and hand down).
SOCKET_ENDPOINT_TYPES = ("tcp", "tcp6", "udp", "udp6", "unix", "ssl", "systemd")

#: Keywords (and positional order) of each endpoint type, as Twisted names them.
_ARGUMENTS = {
    "tcp": ("port", "interface", "backlog"),
    "udp": ("port", "interface", "backlog"),
    "unix": ("address", "mode", "backlog", "lockfile", "wantPID"),
    "systemd": ("domain", "index", "name"),
    # Twisted's order for the positional ones; sslmethod is refused (spoon.tls).
    "ssl": ("port", "privateKey", "certKey", "sslmethod", "interface", "backlog", "extraCertChain",
            "dhParameters", "caCertsDir"),
}


@dataclasses.dataclass(repr=False)
class SocketSpec:
    """What to bind: ``kind`` ("tcp", "udp", "unix" or "systemd"), ``host`` (the path of a
    UNIX socket), ``port`` (None for "unix" and "systemd"), ``backlog`` (None: the server
    class decides), ``mode`` (a UNIX socket's permissions), ``index`` or ``name`` (which
    of the sockets systemd passed: by position, or by the unit's ``FileDescriptorName=``);
    ``proxy``: connections start with a PROXY protocol header
    (a "haproxy:tcp:..." endpoint); ``tls``: the TLS settings of an "ssl:..." endpoint
    (a TCP socket; :mod:`spoon.tls`), None for plain TCP."""

    kind: str
    host: object
    port: object
    backlog: object = None
    mode: object = None
    index: object = None
    name: object = None
    proxy: bool = False
    tls: object = None

    @property
    def datagram(self):
        return self.kind == "udp"

    def __repr__(self):
        return "SocketSpec(%r, %r, %r, backlog=%r, proxy=%r, tls=%r)" % (
            self.kind, self.host, self.port, self.backlog, self.proxy, self.tls
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
    """A :class:`SocketSpec` for "tcp:", "tcp6:", "udp:", "unix:", "ssl:" and "systemd:" endpoint
    strings (the ones that name a socket this process can bind or adopt and hand to a
    supervisor); None for any other type.

    "haproxy:" in front of a tcp: or tcp6: endpoint (Twisted's syntax) gives the same
    socket with ``proxy`` set: its connections start with a PROXY protocol header, which
    spoon servers read themselves (:mod:`spoon.proxy`).

    Raises ValueError for a malformed socket endpoint.
    """
    kind, sep, inner = description.partition(":")
    if sep and kind.strip().lower() == "haproxy":
        spec = parse_socket_endpoint(inner)
        if spec is None or spec.kind != "tcp" or spec.proxy:
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
    kind = kind.rstrip("6")
    names = _ARGUMENTS[kind]
    positional, keywords = [], {}
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if sep:
            keywords[key.strip()] = value
        else:
            positional.append(part)
    for name, value in zip(names, positional):
        keywords.setdefault(name, value)
    if len(positional) > len(names):
        raise ValueError("too many arguments in endpoint %r" % description)
    unknown = set(keywords) - set(names)
    if unknown:
        raise ValueError("unknown option(s) %s in endpoint %r" % (", ".join(sorted(unknown)), description))
    backlog = keywords.get("backlog")
    try:
        backlog = int(backlog) if backlog is not None else None
    except ValueError:
        raise ValueError("endpoint %r: backlog must be a number" % description) from None
    if kind == "unix":
        if not keywords.get("address"):
            raise ValueError("endpoint %r needs a path" % description)
        try:
            mode = int(keywords.get("mode", "666"), 8)
        except ValueError:
            raise ValueError("endpoint %r: mode must be an octal number" % description) from None
        return SocketSpec("unix", keywords["address"], None, backlog, mode=mode)
    if kind == "systemd":
        if ("index" in keywords) == ("name" in keywords):
            raise ValueError(
                "endpoint %r needs index=N or name=NAME (which passed socket: its position, "
                "or the socket unit's FileDescriptorName=), not both" % description
            )
        if "name" in keywords:
            if not keywords["name"]:
                raise ValueError("endpoint %r: name= is empty" % description)
            return SocketSpec("systemd", None, None, name=keywords["name"])
        try:
            index = int(keywords["index"])
        except ValueError:
            raise ValueError("endpoint %r: index must be a number" % description) from None
        return SocketSpec("systemd", None, None, index=index)
    try:
        port = int(keywords["port"])
    except (KeyError, ValueError):
        raise ValueError("endpoint %r needs a numeric port" % description) from None
    tls = None
    if kind == "ssl":
        from spoon import tls as tls_settings

        settings = {key: keywords[key] for key in keywords if key not in ("port", "interface", "backlog")}
        kind, tls = "tcp", tls_settings.check_settings(settings, description)
    default_host = "::" if description.strip().lower().split(":")[0].endswith("6") else "0.0.0.0"
    host = keywords.get("interface") or default_host
    return SocketSpec(kind, host, port, backlog, tls=tls)


def bind_socket(spec, ipv6_only=False, reuse_address=True, backlog=1024, defer_accept=False):
    """Bind (and for TCP, listen on) the socket ``spec`` describes, as a spoon server would:
    IPv6 when the host contains ":", dual-stack unless ``ipv6_only``; a UNIX socket at its
    path; for "systemd", a duplicate of the socket systemd passed (its unit's
    ``DeferAcceptSec=`` says what ``defer_accept`` says for the others).

    ``defer_accept``: a TCP socket of a ``client_speaks_first`` server gets
    ``TCP_DEFER_ACCEPT`` (Linux), as its ``server_activate()`` gives it when the class
    binds itself: the kernel hands a connection over only once its first bytes are in."""
    if spec.kind == "systemd":
        # Systemd passed it to the first generation; a later one inherits it from the old.
        inherited = upgrade.take_inherited_socket(
            None, socket.SOCK_DGRAM if spec.datagram else socket.SOCK_STREAM, None)
        if inherited is not None:
            inherited.setblocking(False)
            return inherited
        return _adopt_systemd(spec)
    family = socket.AF_UNIX if spec.kind == "unix" else (
        socket.AF_INET6 if ":" in spec.host else socket.AF_INET
    )
    kind = socket.SOCK_DGRAM if spec.datagram else socket.SOCK_STREAM
    # A new generation of an upgrade serves the socket the old one listens on.
    inherited = upgrade.take_inherited_socket(
        family, kind, spec.host if family == socket.AF_UNIX else (spec.host, spec.port)
    )
    if inherited is not None:
        # Bound by the old generation's code: the deferral is what this code says.
        set_defer_accept(inherited, defer_accept)
        inherited.setblocking(False)
        return inherited
    if spec.kind == "unix":
        return _bind_unix(spec, backlog)
    sock = socket.socket(family, socket.SOCK_DGRAM if spec.datagram else socket.SOCK_STREAM)
    try:
        if reuse_address:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if ipv6_only else 0)
        sock.bind((spec.host, spec.port))
        if not spec.datagram:
            set_defer_accept(sock, defer_accept)
            sock.listen(spec.backlog if spec.backlog is not None else backlog)
    except OSError as e:
        sock.close()
        where = format_address((spec.host, spec.port))
        raise OSError(e.errno, "cannot bind %s %s: %s" % (spec.kind, where, e.strerror)) from e
    sock.setblocking(False)
    return sock


def set_defer_accept(sock, defer):
    """Turn ``TCP_DEFER_ACCEPT`` on or off on a listening TCP socket, as a server class's
    ``client_speaks_first`` says: on, the kernel hands a connection over only once its
    first bytes are in.  Other sockets, and systems without the option, stay as they are."""
    if (
        sock.type == socket.SOCK_STREAM
        and sock.family in (socket.AF_INET, socket.AF_INET6)
        and hasattr(socket, "TCP_DEFER_ACCEPT")
    ):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1 if defer else 0)


def _bind_unix(spec, backlog):
    path = spec.host
    _remove_stale_unix_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        if spec.mode is not None:
            os.chmod(path, spec.mode)
        sock.listen(spec.backlog if spec.backlog is not None else backlog)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, "cannot bind unix %s: %s" % (path, e.strerror)) from e
    sock.setblocking(False)
    return sock


def _remove_stale_unix_socket(path):
    """A socket file nobody listens on any more (a server that was killed) is removed, as
    a new server must bind the path; one a live server listens on is left alone (the bind
    then fails with "Address already in use")."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return
    except OSError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
    except OSError:
        pass
    finally:
        probe.close()


def _adopt_systemd(spec):
    """The socket systemd passed at ``spec.index`` or named ``spec.name`` (``LISTEN_FDS``
    descriptors from 3 and their ``LISTEN_FDNAMES``, for the process ``LISTEN_PID``
    names), duplicated: the caller owns what it gets."""
    from twisted.python.systemd import ListenFDs

    passed = ListenFDs.fromEnvironment()
    if spec.name is not None:
        named = passed.inheritedNamedDescriptors()
        if spec.name not in named:
            raise OSError(
                0, "systemd:name=%s: systemd passed no socket of that name to this process "
                "(names passed: %s; LISTEN_FDNAMES, LISTEN_PID)"
                % (spec.name, ", ".join(sorted(named)) or "none")
            )
        fd = named[spec.name]
    else:
        descriptors = passed.inheritedDescriptors()
        if not 0 <= spec.index < len(descriptors):
            raise OSError(
                0, "systemd:index=%d: systemd passed %d socket(s) to this process (LISTEN_FDS, "
                "LISTEN_PID)" % (spec.index, len(descriptors))
            )
        fd = descriptors[spec.index]
    sock = socket.socket(fileno=os.dup(fd))
    sock.setblocking(False)
    return sock


def format_address(address):
    """"host:port" ("[v6host]:port"), as log lines and tests read it; a UNIX socket's path."""
    if isinstance(address, (str, bytes)):
        return os.fsdecode(address) or "(unnamed)"
    host, port = address[0], address[1]
    return "[%s]:%s" % (host, port) if ":" in str(host) else "%s:%s" % (host, port)


def socket_options(klass):
    """Binding options a spoon server class declares (defaults for anything else)."""
    return {
        "ipv6_only": bool(getattr(klass, "ipv6_only", False)),
        "reuse_address": bool(getattr(klass, "allow_reuse_address", True)),
        "backlog": int(getattr(klass, "request_queue_size", 1024)),
        "defer_accept": bool(getattr(klass, "client_speaks_first", False)),
    }
