"""Lifecycle hooks run in the process they promise (pids printed by each hook compared
with the supervisor's and its workers'), and a failing hook is logged with its name; in
post_fork it fails that worker's boot."""

import os
import re
import signal

from support import children_of, pid_alive, wait_for

HOOKED = """
import logging, os, sys
import spoon.server

logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                    format="%(asctime)s [%(process)d] %(name)s %(levelname)s: %(message)s")
FAIL = sys.argv[1]

def say(*words):
    # One write with O_APPEND per call, from whichever process runs the hook: nothing
    # depends on a pipe or a buffer that a process on its way out may not drain.
    line = " ".join(["HOOK", str(os.getpid())] + [str(w) for w in words]) + "\\n"
    fd = os.open(FAIL + ".calls", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)

def failing(name):
    if os.path.exists(FAIL + "." + name):
        raise RuntimeError("hook %s broken on purpose" % name)

class Handler(spoon.server.Gulp):
    def handle(self):
        self.rfile.readline()
        self.wfile.write(b"%d\\n" % os.getpid())

class Server(spoon.server.TCPSpork):
    handler_klass = Handler
    prefork = 2
    graceful_timeout = 5

    def when_ready(self):
        say("when_ready")
        failing("when_ready")

    def pre_fork(self, number):
        say("pre_fork", number)

    def post_fork(self, number):
        say("post_fork", number)
        failing("post_fork")

    def worker_exit(self, number):
        say("worker_exit", number)

    def child_exit(self, pid, cause):
        say("child_exit", pid, cause)

    def on_reload(self):
        say("on_reload")

server = Server(("127.0.0.1", 0))
print("READY", server.server_address[1], flush=True)
server.serve_forever()
"""

HOOK_LINE = re.compile(r"^HOOK (\d+) (\w+)(.*)$")


def hook_calls(proc):
    """[(pid, hook name, args)] the hooks recorded so far (see ``say``)."""
    calls = []
    try:
        with open(proc.hook_file) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        lines = []
    for line in lines:
        m = HOOK_LINE.match(line)
        if m:
            calls.append((int(m.group(1)), m.group(2), m.group(3).split()))
    return calls


def calls_of(proc, name):
    return [c for c in hook_calls(proc) if c[1] == name]


def start(server_process, tmp_path):
    flag = str(tmp_path / "fail")
    proc = server_process(HOOKED, args=[flag])
    proc.hook_file = flag + ".calls"
    return proc, flag


def test_each_hook_runs_in_the_process_it_promises(server_process, tmp_path):
    proc, _ = start(server_process, tmp_path)
    ready = wait_for(lambda: calls_of(proc, "when_ready"), timeout=15, what="when_ready")
    assert ready == [(proc.pid, "when_ready", [])]
    workers = set(children_of(proc.pid))
    assert len(workers) == 2
    # pre_fork in the supervisor, once per worker number; post_fork in each worker.
    assert sorted(c[2] for c in calls_of(proc, "pre_fork")) == [["1"], ["2"]]
    assert {c[0] for c in calls_of(proc, "pre_fork")} == {proc.pid}
    post = calls_of(proc, "post_fork")
    assert {c[0] for c in post} == workers
    assert sorted(c[2] for c in post) == [["1"], ["2"]]

    proc.signal(signal.SIGUSR1)
    assert wait_for(lambda: calls_of(proc, "on_reload"), what="on_reload") == [
        (proc.pid, "on_reload", [])
    ]

    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    exits = wait_for(lambda: calls_of(proc, "child_exit"), what="child_exit")
    assert exits == [(proc.pid, "child_exit", [str(victim), "killed"])]

    wait_for(lambda: len(children_of(proc.pid)) == 2, what="the replacement")
    survivors = set(children_of(proc.pid))
    # Stop only once the replacement serves (its reactor runs its handlers): a worker
    # stopped while it starts up has no worker_exit to run.
    wait_for(lambda: all(any("Worker %d serving" % pid in line for line in proc.lines_so_far())
                         for pid in survivors), timeout=15, what="the replacement serving")
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    proc.read_output()
    # worker_exit in each worker on its way out; child_exit in the supervisor after it.
    assert {c[0] for c in calls_of(proc, "worker_exit")} == survivors
    stopped = [c for c in calls_of(proc, "child_exit") if c[2][1] == "stopped"]
    assert {int(c[2][0]) for c in stopped} == survivors
    assert {c[0] for c in stopped} == {proc.pid}


def test_a_failing_post_fork_fails_that_workers_boot_and_is_logged_by_name(server_process, tmp_path):
    proc, flag = start(server_process, tmp_path)
    wait_for(lambda: calls_of(proc, "when_ready"), timeout=15, what="when_ready")
    open(flag + ".post_fork", "w").close()
    victim = min(children_of(proc.pid))
    os.kill(victim, signal.SIGKILL)
    failed = wait_for(
        lambda: [c for c in calls_of(proc, "child_exit") if c[2][1] == "boot_failure"],
        timeout=10, what="a boot failure",
    )
    failed_pid = int(failed[0][2][0])
    assert failed_pid != victim and not pid_alive(failed_pid)
    out = "\n".join(proc.lines_so_far())
    assert "Hook post_fork() failed" in out
    assert "hook post_fork broken on purpose" in out
    os.unlink(flag + ".post_fork")
    wait_for(lambda: len(children_of(proc.pid)) == 2, timeout=10, what="a worker that boots")


def test_a_failing_hook_elsewhere_is_logged_by_name_and_the_pool_serves_on(server_process, tmp_path):
    flag = str(tmp_path / "fail")
    open(flag + ".when_ready", "w").close()
    proc = server_process(HOOKED, args=[flag])
    wait_for(lambda: "Hook when_ready() failed" in "\n".join(proc.lines_so_far()), timeout=15,
             what="the failed hook's log line")
    assert "hook when_ready broken on purpose" in "\n".join(proc.lines_so_far())
    from support import request

    assert int(request(("127.0.0.1", proc.port), b"x\n")) in children_of(proc.pid)
