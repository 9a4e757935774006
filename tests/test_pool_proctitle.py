"""Process titles: ``ps`` tells the supervisor from its workers (read from
/proc/PID/cmdline of real processes), and a missing ``setproctitle`` is no error."""

import signal
import socket

from support import children_of, process_title, request, wait_for

from spoon.pool.proctitle import socket_text

SPORK = """
import sys
if "--no-setproctitle" in sys.argv:
    sys.modules["setproctitle"] = None  # as if it were not installed
import os
import spoon.server

class Pid(spoon.server.Gulp):
    def handle(self):
        self.rfile.readline()
        self.wfile.write(b"%d" % os.getpid())

class Server(spoon.server.TCPSpork):
    handler_klass = Pid
    prefork = 2

server = Server(("127.0.0.1", 0))
print("READY", server.server_address[1], flush=True)
server.serve_forever()
"""


def test_ps_shows_the_supervisor_with_its_target_and_socket_and_each_worker_numbered(server_process):
    proc = server_process(SPORK)
    workers = wait_for(lambda: len(children_of(proc.pid)) == 2 and children_of(proc.pid), timeout=15)
    assert int(request(("127.0.0.1", proc.port), b"pid\n", timeout=10)) in workers
    assert process_title(proc.pid) == (
        "spoon: supervisor __main__.Server [tcp:%d:interface=127.0.0.1]" % proc.port
    )
    titles = sorted(process_title(pid) for pid in workers)
    assert titles == ["spoon: worker 1 __main__.Server", "spoon: worker 2 __main__.Server"]
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0


def test_without_setproctitle_the_pool_serves_under_its_command_line(server_process):
    proc = server_process(SPORK, args=["--no-setproctitle"])
    workers = wait_for(lambda: len(children_of(proc.pid)) == 2 and children_of(proc.pid), timeout=15)
    assert int(request(("127.0.0.1", proc.port), b"pid\n", timeout=10)) in workers
    for pid in [proc.pid, *workers]:
        assert "--no-setproctitle" in process_title(pid)
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0


def test_the_socket_is_named_in_endpoint_syntax():
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as udp6, socket.socket() as tcp:
        udp6.bind(("::1", 0))
        tcp.bind(("0.0.0.0", 0))
        assert socket_text(udp6) == "udp:%d:interface=::1" % udp6.getsockname()[1]
        assert socket_text(tcp) == "tcp:%d" % tcp.getsockname()[1]
    assert socket_text(None) == "?"
