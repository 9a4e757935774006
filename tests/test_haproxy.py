"""Two pre-forked spoon instances behind a real HAProxy, configured by examples/haproxy.cfg.

HAProxy (Debian's package) is installed here when missing (``apt-get install -y haproxy``,
after ``apt-get update`` if the first attempt fails); the tests are skipped, with the
reason, only where it cannot be installed (not root, no apt-get, no network).

The example file runs with its addresses replaced by loopback ports: the frontend on
127.0.0.1, the two instances (``tests/proxy_servers.py: WhoSpork``, two workers each,
``proxy_protocol = True``) on ports of their own.  Clients connect from 127.0.0.2, so an
instance that reports 127.0.0.2 (and the client's own port) got it from the PROXY header.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest

from support import ROOT, bound_client, pid_alive, recv_all, wait_for

EXAMPLE = os.path.join(ROOT, "examples", "haproxy.cfg")
CLIENT_HOST = "127.0.0.2"


def _find_haproxy():
    return shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)), None
    )


def _apt_get(*args):
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        done = subprocess.run(
            ["apt-get", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600
        )
    except subprocess.TimeoutExpired:
        return "apt-get %s timed out" % " ".join(args)
    return None if done.returncode == 0 else done.stdout.decode("utf8", "replace")[-500:]


@pytest.fixture(scope="session")
def haproxy_binary():
    """The haproxy program, installed with apt-get when missing (once per test run)."""
    found = _find_haproxy()
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("haproxy is not installed and cannot be installed here (needs root and apt-get)")
    failure = _apt_get("install", "-y", "haproxy")
    if failure is not None:
        failure = _apt_get("update") or _apt_get("install", "-y", "haproxy")
    found = _find_haproxy()
    if not found:
        pytest.skip("haproxy could not be installed with apt-get: %s" % (failure or "no haproxy after install"))
    return found


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def configuration(front, backends):
    """examples/haproxy.cfg with its frontend on 127.0.0.1:``front`` and its two servers at
    127.0.0.1:``backends``; each replaced text must be in the file exactly once, so the
    test breaks when the example drifts from what it checks."""
    with open(EXAMPLE) as f:
        text = f.read()
    replacements = {
        "bind :25\n": "bind 127.0.0.1:%d\n" % front,
        "10.0.0.11:2525": "127.0.0.1:%d" % backends[0],
        "10.0.0.12:2525": "127.0.0.1:%d" % backends[1],
    }
    for old, new in replacements.items():
        assert text.count(old) == 1, "examples/haproxy.cfg no longer has %r once" % old
        text = text.replace(old, new)
    return text


START = """
    from proxy_servers import WhoSpork
    server = WhoSpork(("127.0.0.1", 0))
    print("READY", server.server_address[1], flush=True)
    server.serve_forever()
"""


def ask(front, word, timeout=10.0):
    """One request through the frontend from 127.0.0.2: (reply fields, client port)."""
    with bound_client(CLIENT_HOST, timeout=timeout) as sock:
        sock.connect(("127.0.0.1", front))
        sock.sendall(word + b"\n")
        reply = recv_all(sock)
        return reply.split(), sock.getsockname()[1]


class Deployment:
    """HAProxy and two spoon instances, A and B; everything killed by pid at the end."""

    def __init__(self, haproxy, tmp_path, server_process):
        self.instances = {
            name: server_process(START, env={"SPOON_INSTANCE": name}, ready_timeout=30)
            for name in ("A", "B")
        }
        self.front = _free_port()
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(configuration(self.front, [p.port for p in self.instances.values()]))
        self.log = open(tmp_path / "haproxy.out", "wb")
        self.haproxy = subprocess.Popen(
            [haproxy, "-db", "-f", str(cfg)],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait_until_both_serve(self):
        seen = set()

        def both():
            try:
                fields, _ = ask(self.front, b"hello", timeout=2)
            except OSError:
                return False
            if fields:
                seen.add(fields[0])
            return seen >= {b"A", b"B"}

        try:
            wait_for(both, timeout=30, interval=0.05, what="both instances answering through HAProxy")
        except AssertionError as e:
            self.log.flush()
            with open(self.log.name, "rb") as f:
                raise AssertionError("%s; HAProxy said:\n%s" % (e, f.read().decode("utf8", "replace")))

    def close(self):
        if self.haproxy.poll() is None:
            self.haproxy.kill()
        self.haproxy.wait(timeout=10)
        self.log.close()


@pytest.fixture
def deployment(haproxy_binary, tmp_path, server_process):
    d = Deployment(haproxy_binary, tmp_path, server_process)
    try:
        d.wait_until_both_serve()
        yield d
    finally:
        d.close()


def test_example_configuration_is_valid_for_haproxy(haproxy_binary, tmp_path):
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(configuration(_free_port(), [_free_port(), _free_port()]))
    checked = subprocess.run(
        [haproxy_binary, "-c", "-f", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30
    )
    out = checked.stdout.decode("utf8", "replace")
    assert checked.returncode == 0, out
    assert "WARNING" not in out.upper(), out


def test_requests_spread_over_both_instances_and_see_the_original_client(deployment):
    by_instance, by_worker = {}, {}
    for i in range(40):
        fields, client_port = ask(deployment.front, b"req%d" % i)
        instance, worker, host, port, echoed = fields
        assert (host, int(port), echoed) == (CLIENT_HOST.encode(), client_port, b"req%d" % i)
        by_instance[instance] = by_instance.get(instance, 0) + 1
        by_worker[worker] = by_worker.get(worker, 0) + 1
    print("\nspread over the instances: %s; over the workers: %s"
          % (sorted(by_instance.items()), sorted(by_worker.values())))
    # Round robin: every other request to each instance.
    assert by_instance == {b"A": 20, b"B": 20}


def test_term_of_one_instance_under_load_loses_no_request(deployment):
    results = []  # (instance or None, error text or None, time)
    stop = threading.Event()

    def client(n):
        i = 0
        while not stop.is_set():
            word = b"slow-c%d-%d" % (n, i)
            i += 1
            try:
                fields, client_port = ask(deployment.front, word)
                ok = len(fields) == 5 and fields[2:] == [CLIENT_HOST.encode(), b"%d" % client_port, word]
                results.append((fields[0] if ok else None, None if ok else repr(fields), time.monotonic()))
            except OSError as e:
                results.append((None, repr(e), time.monotonic()))

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(8)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(results) >= 100, timeout=60, what="100 requests before the stop")
        a = deployment.instances["A"]
        a.signal(signal.SIGTERM)
        term_at = time.monotonic()
        status = a.wait(timeout=30)
        gone_at = time.monotonic()
        count_at_exit = len(results)
        wait_for(lambda: len(results) >= count_at_exit + 100, timeout=60, what="100 requests after the stop")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    failures = [r for r in results if r[0] is None]
    during = [r for r in results if term_at <= r[2] <= gone_at]
    after = [r[0] for r in results if r[2] > gone_at + 0.5]
    print(
        "\n%d requests, %d failed; %d completed while instance A drained (%.2fs), A exited %s; "
        "after: %s" % (len(results), len(failures), len(during), gone_at - term_at, status,
                       sorted(set(map(repr, after)))),
    )
    assert failures == []
    assert status == 0
    assert set(after) == {b"B"}
    assert not pid_alive(a.pid)
