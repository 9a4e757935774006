"""The PROXY protocol header (spoon.proxy) on its own and in front of Gulp connections, on
Twisted's in-memory transport and clock: no sockets, no sleeps."""

import logging
import socketserver
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

import spoon.server
from spoon import proxy
from spoon.greenio import GulpFactory
from spoon.proxy import AllowList, Header, HeaderPolicy, HeaderReader, ProxyHeaderError
from support import proxy_v1, proxy_v2

CLIENT4 = ("203.0.113.7", 51234)
FRONT4 = ("198.51.100.1", 25)
CLIENT6 = ("2001:db8::7", 40001)
FRONT6 = ("2001:db8::1", 25)

# -- the parser -------------------------------------------------------------------------


def read(data):
    return HeaderReader().feed(data)


def test_v1_tcp4_header_gives_both_addresses_and_what_follows():
    header, rest = read(proxy_v1(CLIENT4, FRONT4) + b"HELO x\r\n")
    assert header == Header(1, "PROXY", CLIENT4, FRONT4)
    assert rest == b"HELO x\r\n"


def test_v1_tcp6_header_gives_ipv6_address_tuples():
    header, rest = read(proxy_v1(CLIENT6, FRONT6))
    assert header == Header(1, "PROXY", CLIENT6 + (0, 0), FRONT6 + (0, 0))
    assert rest == b""


def test_v1_unknown_header_names_no_client():
    header, rest = read(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\nhi")
    assert header == Header(1, "UNKNOWN")
    assert rest == b"hi"


def test_v2_proxy_tcp4_and_tcp6_headers_skip_their_tlvs():
    tlv = b"\x04" + struct.pack("!H", 3) + b"abc"  # PP2_TYPE_NOOP
    header, rest = read(proxy_v2(CLIENT4, FRONT4, tlvs=tlv) + b"data")
    assert header == Header(2, "PROXY", CLIENT4, FRONT4)
    assert rest == b"data"
    header, rest = read(proxy_v2(CLIENT6, FRONT6))
    assert header == Header(2, "PROXY", CLIENT6 + (0, 0), FRONT6 + (0, 0))


def test_v2_local_header_of_a_health_check_names_no_client():
    header, rest = read(proxy_v2(command=0) + b"ping\n")
    assert header == Header(2, "LOCAL")
    assert rest == b"ping\n"


def test_v2_proxy_header_of_an_unspecified_family_names_no_client():
    fixed = proxy.V2_SIGNATURE + bytes([0x21, 0x00]) + struct.pack("!H", 0)
    assert read(fixed) == (Header(2, "UNKNOWN"), b"")


@pytest.mark.parametrize(
    "header",
    [proxy_v1(CLIENT4, FRONT4), proxy_v1(CLIENT6, FRONT6), proxy_v2(CLIENT4, FRONT4),
     proxy_v2(CLIENT6, FRONT6), proxy_v2(command=0)],
    ids=["v1-tcp4", "v1-tcp6", "v2-tcp4", "v2-tcp6", "v2-local"],
)
def test_every_truncation_of_a_header_waits_for_more(header):
    for end in range(len(header)):
        assert HeaderReader().feed(header[:end]) is None, end


@pytest.mark.parametrize(
    "garbage",
    [b"GET / HTTP/1.0\r\n\r\n", b"EHLO x\r\n", b"\x16\x03\x01\x02\x00", b"PROXZ TCP4",
     b"\r\n\r\n\x00\r\nQUIZ\n\x21\x11\x00\x0c"],
)
def test_bytes_that_are_not_a_header_are_refused_at_the_first_wrong_byte(garbage):
    with pytest.raises(ProxyHeaderError):
        read(garbage)


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 203.0.113.7 198.51.100.1 51234\r\n",  # a field missing
        b"PROXY TCP4 203.0.113.7 198.51.100.1 51234 25 9\r\n",  # one too many
        b"PROXY TCP4 2001:db8::7 198.51.100.1 51234 25\r\n",  # IPv6 in a TCP4 line
        b"PROXY TCP6 203.0.113.7 2001:db8::1 51234 25\r\n",  # IPv4 in a TCP6 line
        b"PROXY TCP4 203.0.113.700 198.51.100.1 51234 25\r\n",
        b"PROXY TCP4 203.0.113.7 198.51.100.1 65536 25\r\n",
        b"PROXY TCP4 203.0.113.7 198.51.100.1 051234 25\r\n",
        b"PROXY TCP4 203.0.113.7 198.51.100.1 -1 25\r\n",
        b"PROXY UDP4 203.0.113.7 198.51.100.1 51234 25\r\n",
        b"PROXY TCP4  203.0.113.7 198.51.100.1 51234 25\r\n",
        b"PROXY TCP4 203.0.113.7 198.51.100.1 51234 25\n",  # bare newline
        b"PROXY TCP4 203.0.113.7 198.51.100.\xff 51234 25\r\n",
    ],
)
def test_a_malformed_v1_line_is_refused(line):
    with pytest.raises(ProxyHeaderError):
        read(line)


def test_a_v1_line_without_end_within_107_bytes_is_refused_as_oversized():
    reader = HeaderReader()
    assert reader.feed(b"PROXY TCP4 " + b"1" * 95) is None  # 106 bytes: may still end
    with pytest.raises(ProxyHeaderError, match="107"):
        reader.feed(b"1")


def test_a_v2_block_longer_than_the_limit_is_refused_from_its_length_field():
    fixed = proxy.V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", proxy.V2_MAX_BODY + 1)
    with pytest.raises(ProxyHeaderError, match="more than"):
        read(fixed)  # no need to buffer the block to know


@pytest.mark.parametrize(
    "version_command, family, block",
    [
        (0x11, 0x11, bytes(12)),  # version 1 in the binary format
        (0x22, 0x11, bytes(12)),  # command 2
        (0x21, 0x12, bytes(12)),  # a datagram header
        (0x21, 0x11, bytes(11)),  # TCP4 block too short
        (0x21, 0x21, bytes(35)),  # TCP6 block too short
        (0x21, 0x41, bytes(12)),  # family 4
    ],
)
def test_a_malformed_v2_header_is_refused(version_command, family, block):
    data = proxy.V2_SIGNATURE + bytes([version_command, family]) + struct.pack("!H", len(block)) + block
    with pytest.raises(ProxyHeaderError):
        read(data)


HEADERS = st.sampled_from(
    [proxy_v1(CLIENT4, FRONT4), proxy_v1(CLIENT6, FRONT6), b"PROXY UNKNOWN\r\n",
     proxy_v2(CLIENT4, FRONT4), proxy_v2(CLIENT6, FRONT6, tlvs=b"\x04\x00\x01z"), proxy_v2(command=0)]
)


def _feed_chunks(data, cuts):
    """Feed ``data`` cut at ``cuts``; (header, everything after it) or the error raised."""
    reader = HeaderReader()
    bounds = [0] + sorted(set(c % (len(data) + 1) for c in cuts)) + [len(data)]
    chunks = [data[a:b] for a, b in zip(bounds, bounds[1:])]
    for i, chunk in enumerate(chunks):
        try:
            parsed = reader.feed(chunk)
        except ProxyHeaderError as e:
            return ("error", type(e))
        if parsed is not None:
            header, rest = parsed
            return (header, rest + b"".join(chunks[i + 1 :]))
    return None


@settings(max_examples=300, deadline=None)
@given(HEADERS, st.binary(max_size=40), st.lists(st.integers(min_value=0), max_size=12))
def test_any_split_of_a_header_and_payload_reads_the_same(header, payload, cuts):
    assert _feed_chunks(header + payload, cuts) == _feed_chunks(header + payload, [])
    assert _feed_chunks(header + payload, cuts)[1] == payload


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=140), st.lists(st.integers(min_value=0), max_size=8))
def test_any_bytes_give_a_header_an_error_or_a_wait_whatever_the_split(data, cuts):
    assert _feed_chunks(data, cuts) == _feed_chunks(data, [])


# -- the allow-list ----------------------------------------------------------------------


def test_default_allow_list_is_loopback_only_including_mapped_ipv4():
    allow = AllowList()
    assert allow.allows(("127.0.0.1", 1))
    assert allow.allows(("127.0.0.2", 1))
    assert allow.allows(("::1", 1, 0, 0))
    assert allow.allows(("::ffff:127.0.0.1", 1, 0, 0))  # a dual-stack socket's view
    assert not allow.allows(("10.0.0.1", 1))
    assert not allow.allows(("::ffff:10.0.0.1", 1, 0, 0))
    assert not allow.allows(("2001:db8::1", 1, 0, 0))


def test_allow_list_takes_addresses_and_networks_as_a_list_or_a_string():
    allow = AllowList("10.1.0.0/16, 192.0.2.5 2001:db8::/32")
    assert allow.allows(("10.1.200.3", 1)) and allow.allows(("192.0.2.5", 1))
    assert allow.allows(("2001:db8::99", 1, 0, 0))
    assert not allow.allows(("192.0.2.6", 1)) and not allow.allows(("127.0.0.1", 1))
    assert AllowList(["192.0.2.0/24"]).allows(("192.0.2.9", 1))


def test_an_allow_list_entry_that_is_not_an_address_is_an_error_naming_it():
    with pytest.raises(ValueError, match="proxy_allow_from.*balancer.example"):
        AllowList(["balancer.example"])


# -- in front of a Gulp connection ---------------------------------------------------------


class Recorder(socketserver.BaseServer):
    """A socketserver server recording what verify_request saw."""

    def __init__(self, handler):
        super().__init__(("127.0.0.1", 0), handler)
        self.verified = []

    def verify_request(self, request, client_address):
        self.verified.append(client_address)
        return True

    def handle_error(self, request, client_address):
        raise


class Who(spoon.server.Gulp):
    """Reply with the client address and the first line."""

    def handle(self):
        line = self.rfile.readline()
        self.wfile.write(b"%r %r %s" % (self.client_address, self.request.getpeername(), line))


class Balanced:
    """One connection from ``peer`` to a server with the PROXY protocol on."""

    def __init__(self, peer=("127.0.0.1", 40000), allow=proxy.DEFAULT_ALLOW_FROM, lazy=False, same_server_as=None):
        if same_server_as is not None:
            self.server, self.clock, self.factory = (
                same_server_as.server, same_server_as.clock, same_server_as.factory
            )
        else:
            self.server = Recorder(Who)
            self.clock = MemoryReactorClock()
            policy = HeaderPolicy(allow, logging.getLogger("test-proxy"), self.clock)
            self.factory = GulpFactory(self.server, self.clock, lazy_start=lazy, preface=policy)
        self.proto = self.factory.buildProtocol(None)
        kind = IPv6Address if ":" in peer[0] else IPv4Address
        self.transport = StringTransport(peerAddress=kind("TCP", *peer[:2]))
        self.proto.makeConnection(self.transport)

    def feed(self, data):
        self.proto.dataReceived(data)

    def reply(self):
        return self.transport.value()

    @property
    def closed(self):
        return self.transport.disconnecting


def test_handler_and_verify_request_see_the_client_the_header_names():
    c = Balanced()
    c.feed(proxy_v1(CLIENT4, FRONT4) + b"hello\n")
    assert c.server.verified == [CLIENT4]
    assert c.reply() == b"%r %r hello\n" % (CLIENT4, CLIENT4)
    assert c.closed


@pytest.mark.parametrize(
    "header, client",
    [(proxy_v1(CLIENT4, FRONT4), CLIENT4), (proxy_v1(CLIENT6, FRONT6), CLIENT6 + (0, 0)),
     (proxy_v2(CLIENT4, FRONT4), CLIENT4), (proxy_v2(CLIENT6, FRONT6), CLIENT6 + (0, 0))],
    ids=["v1-tcp4", "v1-tcp6", "v2-tcp4", "v2-tcp6"],
)
def test_a_header_split_across_reads_at_every_offset_gives_the_same_reply(header, client):
    data = header + b"hello\n"
    expected = b"%r %r hello\n" % (client, client)
    for cut in range(1, len(data)):
        c = Balanced()
        c.feed(data[:cut])
        assert (c.server.verified == []) == (cut < len(header)), cut
        c.feed(data[cut:])
        assert c.server.verified == [client], cut
        assert c.reply() == expected, cut


def test_nothing_of_the_handler_runs_before_the_header_is_complete():
    c = Balanced()
    header = proxy_v2(CLIENT4, FRONT4)
    c.feed(header[:-1])
    assert c.server.verified == [] and c.factory.active_handlers == 0
    c.feed(header[-1:])
    assert c.server.verified == [CLIENT4]  # a server-speaks-first handler starts now
    assert c.factory.active_handlers == 1


def test_with_lazy_start_the_handler_waits_for_the_first_byte_after_the_header():
    c = Balanced(lazy=True)
    c.feed(proxy_v1(CLIENT4, FRONT4))
    assert c.server.verified == []
    c.feed(b"hi\n")
    assert c.server.verified == [CLIENT4]


def test_a_local_health_check_keeps_the_balancers_own_address():
    c = Balanced(peer=("127.0.0.1", 40000))
    c.feed(proxy_v2(command=0) + b"ping\n")
    assert c.server.verified == [("127.0.0.1", 40000)]


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "test-proxy" and r.levelno == logging.WARNING]


def test_a_header_from_an_address_not_allowed_is_refused_and_logged_once(caplog):
    caplog.set_level(logging.INFO, "test-proxy")
    first = Balanced(peer=("192.0.2.9", 40000))
    assert first.closed
    first.feed(proxy_v1(CLIENT4, FRONT4) + b"hello\n")
    assert first.server.verified == [] and first.reply() == b""
    assert _warnings(caplog) == [
        "Refused a connection from 192.0.2.9:40000: PROXY protocol: not in proxy_allow_from"
    ]
    for port in range(40001, 40004):
        assert Balanced(peer=("192.0.2.9", port), same_server_as=first).closed
    assert len(_warnings(caplog)) == 1  # repeats are counted, not logged
    first.clock.advance(proxy.REPORT_INTERVAL)
    assert "(the same refusal, repeated 3 times in the last 10s)" in _warnings(caplog)[1]
    assert "192.0.2.9:40003" in _warnings(caplog)[1]


def test_an_explicit_allow_list_admits_the_balancer_it_names_and_only_it():
    c = Balanced(peer=("192.0.2.9", 40000), allow=["192.0.2.0/28"])
    c.feed(proxy_v1(CLIENT4, FRONT4) + b"hello\n")
    assert c.server.verified == [CLIENT4]
    assert Balanced(peer=("127.0.0.1", 40000), allow=["192.0.2.0/28"]).closed


def test_a_connection_without_a_header_is_closed_before_any_hook_runs(caplog):
    caplog.set_level(logging.INFO, "test-proxy")
    c = Balanced()
    c.feed(b"hello\n")
    assert c.closed and c.server.verified == [] and c.reply() == b""
    assert _warnings(caplog) == [
        "Refused a connection from 127.0.0.1:40000: PROXY protocol: invalid header: the "
        "connection does not start with a PROXY protocol header"
    ]


def test_a_connection_ending_inside_the_header_is_closed_without_the_handler():
    c = Balanced()
    c.feed(proxy_v1(CLIENT4, FRONT4)[:20])
    c.proto.readConnectionLost()
    assert c.closed and c.server.verified == []


def test_a_connection_that_sends_no_complete_header_in_time_is_closed(caplog):
    caplog.set_level(logging.INFO, "test-proxy")
    c = Balanced()
    c.feed(b"PROXY TCP4 ")
    c.clock.advance(proxy.HEADER_TIMEOUT - 0.01)
    assert not c.closed
    c.clock.advance(0.01)
    assert c.closed and c.server.verified == []
    assert "no complete header within 10s" in _warnings(caplog)[0]


def test_a_connection_gone_during_the_header_leaves_no_timer_behind():
    c = Balanced()
    c.feed(b"PROXY ")
    c.proto.connectionLost(None)
    assert c.clock.getDelayedCalls() == []
    assert c.factory.connections == set()


def test_a_server_class_turns_the_protocol_on_with_one_attribute():
    class Proxied(spoon.server.TCPSpoon):
        handler_klass = Who
        proxy_protocol = True
        proxy_allow_from = ["192.0.2.0/24"]

    server = Proxied(("127.0.0.1", 0))
    try:
        factory = server.protocol_factory(MemoryReactorClock())
        assert isinstance(factory.preface, HeaderPolicy)
        assert factory.preface.allow.allows(("192.0.2.1", 1))
        assert not factory.preface.allow.allows(("127.0.0.1", 1))
        assert spoon.server.TCPSpoon.proxy_protocol is False
        plain = spoon.server.TCPSpoon.__new__(spoon.server.TCPSpoon)
        assert type(plain).proxy_allow_from == proxy.DEFAULT_ALLOW_FROM
    finally:
        server.server_close()


# -- the haproxy: endpoint string --------------------------------------------------------


def test_a_haproxy_endpoint_names_the_same_socket_with_the_header_on():
    from spoon.net import parse_socket_endpoint

    spec = parse_socket_endpoint("haproxy:tcp:2525:interface=127.0.0.1")
    assert (spec.kind, spec.host, spec.port, spec.proxy) == ("tcp", "127.0.0.1", 2525, True)
    six = parse_socket_endpoint("haproxy:tcp6:2525:interface=\\:\\:1")
    assert (six.host, six.proxy) == ("::1", True)
    assert parse_socket_endpoint("tcp:2525").proxy is False


@pytest.mark.parametrize("description", ["haproxy:udp:53", "haproxy:unix:/run/x.sock", "haproxy:haproxy:tcp:1"])
def test_a_haproxy_endpoint_other_than_tcp_is_refused_with_the_way_out(description):
    from spoon.net import parse_socket_endpoint

    with pytest.raises(ValueError, match="tcp: and tcp6: endpoints only.*proxy_protocol"):
        parse_socket_endpoint(description)


def test_protocol_factory_can_turn_the_header_on_for_one_listener():
    class Plain(spoon.server.TCPSpoon):
        handler_klass = Who

    server = Plain(("127.0.0.1", 0))
    try:
        clock = MemoryReactorClock()
        assert server.protocol_factory(clock).preface is None
        assert isinstance(server.protocol_factory(clock, proxy_protocol=True).preface, HeaderPolicy)
    finally:
        server.server_close()
