"""The PROXY protocol (versions 1 and 2) in front of a stream connection.

Behind a layer-4 load balancer (HAProxy ``send-proxy`` / ``send-proxy-v2``, AWS NLB, ...)
every connection comes from the balancer; the balancer tells who the client really is in a
header it sends before any byte of the client's.  A server with ``proxy_protocol = True``
reads that header before anything else happens on the connection: ``verify_request``,
the handler's ``client_address`` and ``request.getpeername()`` then see the real client.

Only the addresses in ``proxy_allow_from`` may send the header (anyone else could claim to
be any client); by default that is loopback only (a balancer on the same host), so a
deployment with a balancer elsewhere names it explicitly.  A connection from elsewhere, one
whose first bytes are not a valid header, or one that sends no complete header within
:data:`HEADER_TIMEOUT` seconds is closed without reaching the handler, and logged: the
first of each kind in full, then a count every :data:`REPORT_INTERVAL` seconds while it
goes on (:class:`spoon.errorlog.RepeatLimiter`), so a scanner cannot flood the log.

:class:`HeaderReader` is the parser, fed any chunking of the bytes; :class:`HeaderPolicy`
is what a :class:`spoon.greenio.GulpFactory` runs as the connection's preface
(:class:`spoon.greenio.IConnectionPreface`).  Datagram servers have no connection to put
a header in front of: the PROXY protocol does not apply to them.
"""

import ipaddress
import struct

from zope.interface import implementer

from spoon import errorlog
from spoon.greenio import IConnectionPreface
from spoon.net import format_address

__all__ = [
    "ProxyHeaderError",
    "Header",
    "HeaderReader",
    "AllowList",
    "HeaderPolicy",
    "DEFAULT_ALLOW_FROM",
    "V2_SIGNATURE",
]

#: Who may send a header when the server class does not say: loopback only.
DEFAULT_ALLOW_FROM = ("127.0.0.0/8", "::1")
#: Seconds a connection may take to send its whole header.
HEADER_TIMEOUT = 10.0
#: Seconds between two summaries of repeated refusals of the same kind.
REPORT_INTERVAL = 10.0

V1_PREFIX = b"PROXY "
#: The longest version 1 header, "\r\n" included (the specification's figure).
V1_MAX_LENGTH = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_LENGTH = 16
#: The longest version 2 address block (addresses and TLVs) accepted; a longer one is
#: refused rather than buffered.
V2_MAX_BODY = 4096

_V2_COMMANDS = {0: "LOCAL", 1: "PROXY"}
#: v2 address families carrying IP addresses: name, address size, address type.
_V2_IP_FAMILIES = {1: ("TCP4", 4, ipaddress.IPv4Address), 2: ("TCP6", 16, ipaddress.IPv6Address)}
_V2_UNSPEC_PROTOCOL, _V2_STREAM = 0, 1


class ProxyHeaderError(ValueError):
    """The bytes in front of the connection are not a valid PROXY protocol header."""


class Header:
    """A parsed header: ``version`` (1 or 2), ``command`` ("PROXY", "LOCAL" or "UNKNOWN")
    and the ``source`` and ``destination`` addresses the balancer reported, or None when it
    reported none (LOCAL: its own health check; UNKNOWN or an unsupported family): the
    connection's own addresses then stand."""

    __slots__ = ("version", "command", "source", "destination")

    def __init__(self, version, command, source=None, destination=None):
        self.version = version
        self.command = command
        self.source = source
        self.destination = destination

    def __eq__(self, other):
        return isinstance(other, Header) and all(
            getattr(self, name) == getattr(other, name) for name in self.__slots__
        )

    def __repr__(self):
        return "Header(%r, %r, %r, %r)" % (self.version, self.command, self.source, self.destination)


def _address(ip, port):
    """The address tuple a handler sees: (host, port) for IPv4, (host, port, 0, 0) for
    IPv6, as ``accept()`` gives them on a socket of that family."""
    if ip.version == 6:
        return (str(ip), port, 0, 0)
    return (str(ip), port)


def _v1_port(text):
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[0] == "0"):
        raise ProxyHeaderError("bad port %r in a v1 header" % text)
    port = int(text)
    if port > 65535:
        raise ProxyHeaderError("bad port %r in a v1 header" % text)
    return port


def _v1_ip(text, kind):
    try:
        ip = kind(text)
    except ValueError:
        raise ProxyHeaderError("bad address %r in a v1 header" % text) from None
    return ip


def parse_v1(line):
    """The :class:`Header` of one v1 line (without its "\\r\\n")."""
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("non-ASCII bytes in a v1 header") from None
    if "\r" in text or "\n" in text:
        raise ProxyHeaderError("a v1 header ends with \\r\\n only")
    parts = text.split(" ")
    if parts[0] != "PROXY" or len(parts) < 2:
        raise ProxyHeaderError("not a v1 header")
    family = parts[1]
    if family == "UNKNOWN":
        return Header(1, "UNKNOWN")
    kinds = {"TCP4": ipaddress.IPv4Address, "TCP6": ipaddress.IPv6Address}
    if family not in kinds:
        raise ProxyHeaderError("unknown protocol %r in a v1 header" % family[:16])
    if len(parts) != 6:
        raise ProxyHeaderError("a v1 %s header has 4 fields after it" % family)
    kind = kinds[family]
    source = _address(_v1_ip(parts[2], kind), _v1_port(parts[4]))
    destination = _address(_v1_ip(parts[3], kind), _v1_port(parts[5]))
    return Header(1, "PROXY", source, destination)


def parse_v2(fixed, body):
    """The :class:`Header` of a v2 header: its 16 fixed bytes and its address block."""
    version, command = fixed[12] >> 4, fixed[12] & 0x0F
    if version != 2:
        raise ProxyHeaderError("unknown version %d in a v2 header" % version)
    if command not in _V2_COMMANDS:
        raise ProxyHeaderError("unknown command %d in a v2 header" % command)
    if command == 0:
        # LOCAL: the balancer's own connection (a health check); whatever it says of
        # addresses is to be ignored.
        return Header(2, "LOCAL")
    family, protocol = fixed[13] >> 4, fixed[13] & 0x0F
    if protocol not in (_V2_UNSPEC_PROTOCOL, _V2_STREAM):
        raise ProxyHeaderError("a datagram header in front of a stream connection")
    if family in _V2_IP_FAMILIES and protocol == _V2_STREAM:
        name, size, kind = _V2_IP_FAMILIES[family]
        if len(body) < 2 * size + 4:
            raise ProxyHeaderError("a v2 %s header's address block is too short" % name)
        src, dst, sport, dport = struct.unpack("!%ds%dsHH" % (size, size), body[: 2 * size + 4])
        return Header(2, "PROXY", _address(kind(src), sport), _address(kind(dst), dport))
    if family > 3:
        raise ProxyHeaderError("unknown address family %d in a v2 header" % family)
    # UNSPEC or UNIX: no IP address to report; the connection's own addresses stand.
    return Header(2, "UNKNOWN")


class HeaderReader:
    """Read one header from the start of a stream, fed in chunks of any size.

    :meth:`feed` returns None while the header is incomplete, then ``(header, rest)``:
    ``rest`` is what followed the header in the bytes fed (the client's first bytes).  It
    raises :class:`ProxyHeaderError` as soon as the bytes cannot be a header (garbage is
    refused at its first wrong byte, never buffered up to a maximum).
    """

    def __init__(self, max_v2_body=V2_MAX_BODY):
        self.max_v2_body = max_v2_body
        self._buf = b""

    def feed(self, data):
        buf = self._buf = self._buf + data
        if not buf:
            return None
        if buf[:1] == V1_PREFIX[:1]:
            return self._v1(buf)
        if buf[:1] == V2_SIGNATURE[:1]:
            return self._v2(buf)
        raise ProxyHeaderError("the connection does not start with a PROXY protocol header")

    def _v1(self, buf):
        head = buf[: len(V1_PREFIX)]
        if head != V1_PREFIX[: len(head)]:
            raise ProxyHeaderError("the connection does not start with a PROXY protocol header")
        end = buf.find(b"\r\n", 0, V1_MAX_LENGTH)
        if end < 0:
            if len(buf) >= V1_MAX_LENGTH or b"\n" in buf:
                raise ProxyHeaderError("no \\r\\n within the %d bytes of a v1 header" % V1_MAX_LENGTH)
            return None
        return parse_v1(buf[:end]), buf[end + 2 :]

    def _v2(self, buf):
        head = buf[: len(V2_SIGNATURE)]
        if head != V2_SIGNATURE[: len(head)]:
            raise ProxyHeaderError("the connection does not start with a PROXY protocol header")
        if len(buf) < V2_FIXED_LENGTH:
            return None
        (length,) = struct.unpack("!H", buf[14:16])
        if length > self.max_v2_body:
            raise ProxyHeaderError(
                "a v2 header of %d bytes, more than the %d accepted" % (length, self.max_v2_body)
            )
        end = V2_FIXED_LENGTH + length
        if len(buf) < end:
            # Refuse a bad version or command now rather than after the whole block.
            parse_v2(buf[:V2_FIXED_LENGTH], b"\0" * 36)
            return None
        return parse_v2(buf[:V2_FIXED_LENGTH], buf[V2_FIXED_LENGTH:end]), buf[end:]


def _peer_ip(client_address):
    """The IP address of a connection's peer (an IPv4-mapped IPv6 address as IPv4), or
    None when the peer has none (a UNIX socket)."""
    if not isinstance(client_address, tuple) or not client_address:
        return None
    host = str(client_address[0]).split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class AllowList:
    """The load balancers allowed to send a header: addresses and networks ("10.0.0.7",
    "10.0.0.0/24", "::1"), given as a list or one string separated by spaces or commas.

    A peer without an IP address (a UNIX socket) is allowed: only local processes can
    connect there, and the socket's file permissions say which.
    """

    def __init__(self, entries=DEFAULT_ALLOW_FROM):
        if isinstance(entries, str):
            entries = entries.replace(",", " ").split()
        networks = []
        for entry in entries:
            try:
                networks.append(ipaddress.ip_network(str(entry).strip(), strict=False))
            except ValueError:
                raise ValueError(
                    "proxy_allow_from: %r is not an address or a network (e.g. 10.0.0.0/24)" % (entry,)
                ) from None
        self.networks = tuple(networks)

    def allows(self, client_address):
        ip = _peer_ip(client_address)
        if ip is None:
            return True
        return any(ip in network for network in self.networks if network.version == ip.version)

    def __repr__(self):
        return "AllowList(%r)" % ([str(n) for n in self.networks],)


def _client_text(client_address):
    if isinstance(client_address, tuple) and len(client_address) >= 2:
        return format_address(client_address)
    return repr(client_address)


@implementer(IConnectionPreface)
class HeaderPolicy:
    """Every connection of a server with ``proxy_protocol`` on starts here: refused unless
    its peer is in ``allow_from`` and it sends a valid header within ``timeout`` seconds;
    then its handler sees the client the header names.

    ``log`` is the server's logger; ``reactor`` (default: the global one, looked up when
    first needed) runs the timeouts and the repeat limiter.
    """

    def __init__(self, allow_from=DEFAULT_ALLOW_FROM, log=None, reactor=None, timeout=HEADER_TIMEOUT):
        self.allow = allow_from if isinstance(allow_from, AllowList) else AllowList(allow_from)
        self.log, self.timeout = log, timeout
        self._reactor, self._limiter = reactor, None

    @property
    def reactor(self):
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    def begin(self, transport, client_address, done):
        """Start reading the header of a new connection (see :class:`IConnectionPreface`);
        None when the connection is refused at once (and closed)."""
        if not self.allow.allows(client_address):
            self.refuse(transport, client_address, "not allowed", "not in proxy_allow_from")
            return None
        return _PendingHeader(self, transport, client_address, done)

    def refuse(self, transport, client_address, kind, detail):
        """Close ``transport`` and log why, the first time of each ``kind`` in full."""
        transport.loseConnection()
        if self.log is None:
            return
        if self._limiter is None:
            self._limiter = errorlog.RepeatLimiter(self.reactor, self._report_repeats, REPORT_INTERVAL)
        if self._limiter.admit(kind, (client_address, detail)):
            self.log.warning(
                "Refused a connection from %s: PROXY protocol: %s", _client_text(client_address), detail
            )

    def _report_repeats(self, count, interval, last):
        client_address, detail = last
        self.log.warning("Refused a connection from %s: PROXY protocol: %s (the same refusal, %s)",
                         _client_text(client_address), detail, errorlog.repeated(count, interval))


class _PendingHeader:
    """One connection's header, until it is complete (see :class:`IConnectionPreface`)."""

    def __init__(self, policy, transport, client_address, done):
        self.policy = policy
        self.transport = transport
        self.client_address = client_address
        self.done = done
        self.reader = HeaderReader()
        self.timer = policy.reactor.callLater(policy.timeout, self._timed_out)

    def data_received(self, data):
        try:
            parsed = self.reader.feed(data)
        except ProxyHeaderError as e:
            self._refuse("invalid", "invalid header: %s" % e)
            return
        if parsed is None:
            return
        self.cancel()
        header, rest = parsed
        self.done(header.source or self.client_address, rest)

    def eof(self):
        self._refuse("invalid", "the connection ended before a complete header")

    def cancel(self):
        if self.timer.active():
            self.timer.cancel()

    def _timed_out(self):
        self._refuse("timeout", "no complete header within %gs" % self.policy.timeout)

    def _refuse(self, kind, detail):
        self.cancel()
        self.policy.refuse(self.transport, self.client_address, kind, detail)
