"""The shipped systemd units (examples/spoon.socket, examples/spoon.service): systemd's
own verifier accepts them, and the service's exact command, run under
systemd-socket-activate with a real NOTIFY_SOCKET and WATCHDOG_USEC, serves the passed
socket and tells systemd what the unit's Type=notify expects."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from support import ROOT, request, wait_for

EXAMPLES = os.path.join(ROOT, "examples")
SPOON = os.path.join(os.path.dirname(sys.executable), "spoon")


def _exec_start():
    with open(os.path.join(EXAMPLES, "spoon.service")) as f:
        line = next(l for l in f if l.startswith("ExecStart="))
    return line.split("=", 1)[1].split()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_accepts_the_units(tmp_path):
    for name in ("spoon.socket", "spoon.service"):
        with open(os.path.join(EXAMPLES, name)) as f:
            text = f.read()
        # Where this checkout's spoon command is, instead of the example's /opt/spoon.
        (tmp_path / name).write_text(text.replace("/opt/spoon/bin/spoon", SPOON))
    out = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "spoon.socket"), str(tmp_path / "spoon.service")],
        capture_output=True, text=True, timeout=60,
    )
    problems = [l for l in (out.stdout + out.stderr).splitlines()
                if "spoon" in l and "Failed to" not in l.split(":", 1)[0]]
    assert out.returncode == 0 and not problems, out.stdout + out.stderr


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate is not installed")
def test_the_service_command_serves_the_activated_socket_and_notifies(tmp_path):
    argv = _exec_start()
    assert argv[0] == "/opt/spoon/bin/spoon"
    argv[0] = SPOON
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(0.5)
    port = _free_port()
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", "127.0.0.1:%d" % port, "--fdname", "spoon",
         "-E", "NOTIFY_SOCKET=%s" % (tmp_path / "notify"), "-E", "WATCHDOG_USEC=1000000",
         "-E", "PYTHONPATH=%s" % ROOT, *argv],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    seen = []

    def heard(state, running=True):
        try:
            seen.append(notify.recv(4096).decode())
        except socket.timeout:
            pass
        if running and proc.poll() is not None:
            raise AssertionError("exited %s: %s" % (proc.returncode, proc.stdout.read()))
        return any(state in m for m in seen)

    try:
        # The first client starts the service (it gets the socket with that client queued).
        def answered():
            if proc.poll() is not None:
                raise AssertionError("exited %s: %s" % (proc.returncode, proc.stdout.read()))
            try:
                return request(("127.0.0.1", port), b"Hello World\n", timeout=30)
            except ConnectionRefusedError:  # systemd-socket-activate not listening yet
                return None

        assert wait_for(answered, timeout=30, what="an answer") == b"hello world\n"
        wait_for(lambda: heard("READY=1"), timeout=30, what="READY=1")
        ready = next(m for m in seen if "READY=1" in m)
        mainpid = int(re.search(r"MAINPID=(\d+)", ready).group(1))
        assert mainpid == proc.pid  # the process systemd started is the supervisor (-D)
        wait_for(lambda: heard("WATCHDOG=1"), timeout=10, what="a watchdog ping")
        os.kill(mainpid, signal.SIGUSR1)  # ExecReload
        wait_for(lambda: heard("RELOADING=1"), timeout=10, what="RELOADING=1")
        count = sum("READY=1" in m for m in seen)
        wait_for(lambda: heard("READY=1") and sum("READY=1" in m for m in seen) > count,
                 timeout=10, what="READY=1 after the reload")
        os.kill(mainpid, signal.SIGTERM)  # KillMode=mixed: TERM to the main process
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            raise AssertionError("no exit 30 s after SIGTERM; heard %r; it said:\n%s"
                                 % (seen, proc.stdout.read().decode(errors="replace")))
        assert proc.returncode == 0, proc.stdout.read()
        # What it sent on its way out is still in the socket's queue.
        wait_for(lambda: heard("STOPPING=1", running=False), timeout=10, what="STOPPING=1")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        notify.close()
