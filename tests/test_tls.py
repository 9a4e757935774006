"""TLS endpoints (``ssl:``) for real: certificates made here with ``cryptography``, real
``twistd spoon`` and ``spoon`` commands serving them in one process or a pool of two,
clients speaking TLS through the standard ``ssl`` module; the handler reports the client
certificate ``self.request.getpeercert()`` shows."""

import datetime
import os
import re
import signal
import socket
import ssl
import subprocess
import sys

import pytest

from support import HERE, ServerProcess, log_lines, pid_alive, wait_for

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def _certificate(directory, name, common_name, issuer=None, ca=False):
    """Write <name>.key and <name>.pem (signed by ``issuer``, a (cert, key) pair, or by
    itself); return (cert, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    issuer_cert, issuer_key = issuer or (None, key)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    # The extensions a strict verifier asks for (Python 3.13 turns VERIFY_X509_STRICT on in
    # create_default_context): key identifiers linking each certificate to its issuer, and
    # key usages saying what each key may do.
    builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    builder = builder.add_extension(
        x509.KeyUsage(digital_signature=not ca, content_commitment=False, key_encipherment=False,
                      data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                      encipher_only=False, decipher_only=False),
        critical=True)
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                   ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    with open(os.path.join(directory, name + ".key"), "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    with open(os.path.join(directory, name + ".pem"), "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


@pytest.fixture
def pki(tmp_path):
    """A CA, a server certificate and a client certificate ("alice") it signed."""
    ca = _certificate(str(tmp_path), "ca", "spoon test CA", ca=True)
    _certificate(str(tmp_path), "server", "localhost", issuer=ca)
    _certificate(str(tmp_path), "client", "alice", issuer=ca)
    os.mkdir(str(tmp_path / "cas"))  # what ssl:...:caCertsDir= reads: every *.pem in it
    os.link(str(tmp_path / "ca.pem"), str(tmp_path / "cas" / "ca.pem"))
    return tmp_path


class Twistd:
    """``twistd -n spoon ...`` in ``directory``, its log there; the port read from the log."""

    def __init__(self, directory, spoon_args):
        self.logfile = os.path.join(directory, "twistd.log")
        command = [TWISTD, "--pidfile", os.path.join(directory, "twistd.pid"),
                   "--logfile", self.logfile, "-n", "spoon"] + spoon_args
        self.proc = subprocess.Popen(command, cwd=directory, env=dict(os.environ, PYTHONPATH=HERE),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)

    def log(self):
        return "\n".join(log_lines(self.logfile))

    def port(self):
        def find():
            match = re.search(r"on tcp \[?[^\s\]]*\]?:(\d+)", self.log())
            return int(match.group(1)) if match else None

        return wait_for(find, 30, what="the listening port in the log")

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        wait_for(lambda: not pid_alive(self.proc.pid), 10)


@pytest.fixture
def twistd(pki):
    runs = []

    def start(spoon_args):
        run = Twistd(str(pki), spoon_args)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.stop()


def tls_ask(port, directory, client_cert=True, timeout=10.0):
    """One request over TLS to 127.0.0.1:port, the server checked against the test CA;
    returns the reply line's words (pid, peer)."""
    context = ssl.create_default_context(cafile=os.path.join(directory, "ca.pem"))
    if client_cert:
        context.load_cert_chain(os.path.join(directory, "client.pem"), os.path.join(directory, "client.key"))
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(b"who\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
    return reply.decode().split()


def _endpoint(directory, verify=False, port=0):
    """An ssl: endpoint with the server certificate; with ``verify``, clients must show a
    certificate the test CA signed (caCertsDir=)."""
    extra = ":caCertsDir=" + os.path.join(directory, "cas") if verify else ""
    return "ssl:%d:interface=127.0.0.1:privateKey=%s:certKey=%s%s" % (
        port, os.path.join(directory, "server.key"), os.path.join(directory, "server.pem"), extra)


def served_by_every_worker(port, directory, workers):
    """Ask over TLS with the client certificate until ``workers`` pids answered; every
    answer must name the client "alice"; return the pids."""
    pids = set()

    def all_seen():
        pid, peer = tls_ask(port, directory)
        assert peer == "alice"
        pids.add(int(pid))
        return len(pids) >= workers

    wait_for(all_seen, 30, what="answers from %d workers" % workers)
    return pids


def refused(port, directory):
    """True when a TLS client without a certificate gets no answer."""
    try:
        return tls_ask(port, directory, client_cert=False) == []
    except (ssl.SSLError, OSError):
        return True


@pytest.fixture
def listen_ssl(pki):
    """The Gulp factory of tls_servers.PeerSpork on Twisted's own reactor.listenSSL, with
    a context that requires a client certificate the test CA signed (spoon.tls not used)."""
    server = ServerProcess("""
        import sys
        from twisted.internet import reactor, ssl
        import tls_servers

        def read(name):
            with open(sys.argv[1] + "/" + name) as f:
                return f.read()

        server = tls_servers.PeerSpork(("127.0.0.1", 0), bind_and_activate=False)
        mine = ssl.PrivateCertificate.loadPEM(read("server.key") + read("server.pem"))
        options = mine.options(ssl.Certificate.loadPEM(read("ca.pem")))  # verify, require
        port = reactor.listenSSL(0, server.protocol_factory(reactor), options, interface="127.0.0.1")
        print("READY", port.getHost().port, flush=True)
        reactor.run()
    """, args=[str(pki)])
    yield server
    server.kill()


def test_the_handler_sees_the_verified_client_certificate_and_clients_without_one_are_refused(pki, listen_ssl):
    pid, peer = tls_ask(listen_ssl.port, str(pki))
    assert (int(pid), peer) == (listen_ssl.pid, "alice")
    assert refused(listen_ssl.port, str(pki))


def test_getpeercert_gives_what_the_ssl_module_gives_for_the_same_certificate(pki, listen_ssl):
    """The ssl module's view of the server's certificate (client side), against
    spoon.peercert's conversion of the same certificate file."""
    from OpenSSL import crypto

    from spoon.peercert import peer_certificate

    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    context.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
    with socket.create_connection(("127.0.0.1", listen_ssl.port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as sock:
            seen, der = sock.getpeercert(), sock.getpeercert(binary_form=True)
    x509 = crypto.load_certificate(crypto.FILETYPE_PEM, (pki / "server.pem").read_bytes())
    assert peer_certificate(x509) == seen
    assert peer_certificate(x509, binary_form=True) == der
    assert peer_certificate(None) is None


def test_twistd_single_process_serves_an_ssl_endpoint_and_shows_no_certificate_when_none_was_asked(
        twistd, pki):
    run = twistd(["--server", "tls_servers.PeerSpork", "-s", "1", "-e", _endpoint(str(pki))])
    pid, peer = tls_ask(run.port(), str(pki))
    assert (int(pid), peer) == (run.proc.pid, "none")


def test_twistd_single_process_requires_the_client_certificate_when_given_a_ca(twistd, pki):
    run = twistd(["--server", "tls_servers.PeerSpork", "-s", "1", "-e", _endpoint(str(pki), verify=True)])
    port = run.port()
    pid, peer = tls_ask(port, str(pki))
    assert (int(pid), peer) == (run.proc.pid, "alice")
    assert refused(port, str(pki))


def test_twistd_pool_of_two_serves_tls_in_both_workers_and_refuses_clients_without_a_certificate(
        twistd, pki):
    run = twistd(["--server", "tls_servers.PeerSpork", "-s", "2", "-e", _endpoint(str(pki), verify=True)])
    port = run.port()
    pids = served_by_every_worker(port, str(pki), 2)
    assert run.proc.pid not in pids
    assert refused(port, str(pki))


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_spoon_command_pool_serves_tls_in_both_workers_and_refuses_clients_without_a_certificate(pki):
    port = _free_port()
    command = [sys.executable, "-m", "spoon.daemon", "tls_servers.PeerSpork", "start", "-D", "-s", "2",
               "-p", str(pki / "spoon.pid"), "-e", _endpoint(str(pki), verify=True, port=port)]
    proc = subprocess.Popen(command, cwd=str(pki), env=dict(os.environ, PYTHONPATH=HERE),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: _connects(port), 30, what="the spoon command listening")
        pids = served_by_every_worker(port, str(pki), 2)
        assert proc.pid not in pids
        assert refused(port, str(pki))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def _connects(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_an_ssl_endpoint_is_a_tcp_socket_with_its_tls_settings():
    from spoon.net import parse_socket_endpoint

    spec = parse_socket_endpoint("ssl:8443:k.pem:interface=\\:\\:1:certKey=c.pem:caCertsDir=cas:backlog=7")
    assert (spec.kind, spec.host, spec.port, spec.backlog) == ("tcp", "::1", 8443, 7)
    assert spec.tls == {"privateKey": "k.pem", "certKey": "c.pem", "caCertsDir": "cas"}
    assert parse_socket_endpoint("tcp:8443").tls is None


@pytest.mark.parametrize("description, error", [
    ("ssl:443", "needs privateKey"),
    ("ssl:443:k.pem:c.pem:TLSv1_2_METHOD", "does not support sslmethod"),
    ("ssl:443:privateKey=k.pem:verify=yes", "unknown option"),
])
def test_ssl_endpoints_spoon_cannot_serve_are_refused_with_the_reason(description, error):
    from spoon.net import parse_socket_endpoint

    with pytest.raises(ValueError, match=error):
        parse_socket_endpoint(description)


def test_tls_settings_cross_the_supervisor_command_line_unchanged():
    from spoon import tls

    settings = {"privateKey": "/a/k=1.pem", "certKey": "/a/c.pem", "caCertsDir": "/a/cas"}
    args = tls.to_arguments(settings)
    assert set(args[0::2]) == {"--tls"}
    assert tls.from_arguments(args[1::2]) == settings
