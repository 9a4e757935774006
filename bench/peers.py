"""The servers under test (ours and the peers), how to install and start each one.

Every peer runs the same handler logic (servers/handlers.py, or the equivalent raw
protocol for Twisted and the equivalent functions for gevent).  Peers that need packages
get their own virtual environment under bench/out/, created once and reused.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import procstat

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SERVERS = os.path.join(HERE, "servers")
OUT = os.path.join(HERE, "out")
NOFILE = 65536


class Peer:
    """One server implementation: where its Python lives and how to start it.

    ``workers``: processes that serve requests (1 for single-process servers);
    ``model``: how it serves connections, for the report; ``idle_cap``: at most this many
    idle connections in the memory scenario (None: no cap; 0: not measured, with
    ``idle_reason``); ``requires``: a feature of ours still being written ("spork" or
    "prefork"), the peer is reported as pending until it works; ``only``: the scenarios
    it runs in (None: every one).
    """

    def __init__(self, name, label, model, env="project", script=None, args=(), workers=1,
                 requires=None, idle_cap=None, idle_reason=None, ours=False, launcher=None,
                 only=None):
        self.name = name
        self.label = label
        self.model = model
        self.env = env
        self.script = script
        self.args = list(args)
        self.workers = workers
        self.requires = requires
        self.idle_cap = idle_cap
        self.idle_reason = idle_reason
        self.ours = ours
        self.launcher = launcher
        self.only = only
        self.unavailable = None  # a reason, when it cannot run here

    def python(self, envs):
        return envs[self.env]


PEERS = [
    Peer("spoon", "ours: TCPSpoon", "greenlet per connection on Twisted, 1 process",
         script="ours.py", args=["--kind", "spoon"], ours=True),
    Peer("spork", "ours: TCPSpork prefork=2", "greenlet per connection on Twisted, 2 workers",
         script="ours.py", args=["--kind", "spork", "--workers", "2"], workers=2,
         requires="spork", ours=True),
    # The opt-in for protocols where the client speaks first (the bench's echo is one):
    # TCP_DEFER_ACCEPT and a handler started at the first byte.  Load shapes only.
    Peer("spork-csf", "ours: TCPSpork prefork=2, client_speaks_first",
         "greenlet per connection on Twisted, 2 workers, TCP_DEFER_ACCEPT",
         script="ours.py", args=["--kind", "spork", "--workers", "2", "--client-speaks-first"],
         workers=2, requires="spork", ours=True, only=("shapes",)),
    Peer("twisted", "raw Twisted protocol", "Twisted protocol, 1 process",
         script="twisted_raw.py"),
    Peer("twisted-prefork", "raw Twisted, our prefork=2", "Twisted protocol, 2 workers (spoon.prefork)",
         launcher="prefork", workers=2, requires="prefork"),
    Peer("socketserver", "stdlib TCPServer", "one connection at a time, 1 process",
         script="stdlib_servers.py", args=["--kind", "single"],
         idle_cap=0, idle_reason="serves one connection at a time"),
    Peer("forking", "stdlib ForkingTCPServer", "a process per connection (max_children=40)",
         script="stdlib_servers.py", args=["--kind", "forking"],
         idle_cap=0, idle_reason="a process per connection, at most 40 at a time"),
    Peer("threading", "stdlib ThreadingTCPServer", "a thread per connection",
         script="stdlib_servers.py", args=["--kind", "threading"], idle_cap=1000),
    Peer("spoon-1.0.6", "spoon 1.0.6 TCPSpork prefork=2", "one connection at a time per worker, 2 workers",
         env="spoon106", script="spoon106.py", args=["--workers", "2"], workers=2,
         idle_cap=0, idle_reason="serves one connection at a time per worker"),
    Peer("gevent", "gevent StreamServer prefork=2", "greenlet per connection on libev/libuv, 2 workers",
         env="gevent", script="gevent_prefork.py", args=["--workers", "2"], workers=2),
]

#: Virtual environments of the peers: directory name and what pip installs there.
ENVS = {
    "spoon106": ("venv-spoon106", ["spoon==1.0.6"]),
    "gevent": ("venv-gevent", ["gevent"]),
}


def log(msg):
    sys.stderr.write("[bench %s] %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


def ensure_env(name, python=sys.executable):
    """The Python of peer environment ``name``, creating it on first use (idempotent: a
    marker file records what was installed).  Returns (python, error)."""
    dirname, requirements = ENVS[name]
    path = os.path.join(OUT, dirname)
    py = os.path.join(path, "bin", "python")
    marker = os.path.join(path, ".bench-installed")
    want = " ".join(requirements)
    try:
        with open(marker) as f:
            if f.read().strip() == want and os.path.exists(py):
                return py, None
    except OSError:
        pass
    log("installing %s into %s" % (want, os.path.relpath(path, ROOT)))
    os.makedirs(OUT, exist_ok=True)
    base = getattr(sys, "_base_executable", None) or python
    try:
        subprocess.run([base, "-m", "venv", "--clear", path], check=True, timeout=300,
                       stdout=subprocess.DEVNULL)
        subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        *requirements], check=True, timeout=600, cwd=OUT,
                       stdout=subprocess.DEVNULL)
    except (subprocess.SubprocessError, OSError) as e:
        return None, "could not install %s: %s" % (want, e)
    with open(marker, "w") as f:
        f.write(want + "\n")
    return py, None


def env_version(py, module, attr="__version__"):
    """``module.__version__`` as seen by interpreter ``py`` (from a neutral directory)."""
    try:
        out = subprocess.run(
            [py, "-c", "import %s as m; print(getattr(m, %r, '?'))" % (module, attr)],
            capture_output=True, text=True, timeout=60, cwd=OUT,
        )
        return out.stdout.strip() or None
    except (subprocess.SubprocessError, OSError):
        return None


def feature_ready(feature, py):
    """Is a feature of ours that another engineer is writing usable yet?  Returns None
    when ready, else why not."""
    if not os.path.exists(os.path.join(ROOT, "spoon", "prefork.py")):
        return "pending: spoon/prefork.py is not there yet"
    if feature == "prefork":
        try:
            out = subprocess.run([py, "-m", "spoon.prefork", "--help"], capture_output=True,
                                 text=True, timeout=60, cwd=ROOT)
        except (subprocess.SubprocessError, OSError) as e:
            return "pending: python -m spoon.prefork: %s" % e
        if out.returncode != 0 or "--target" not in out.stdout or "--fd" not in out.stdout:
            return "pending: python -m spoon.prefork --fd/--target not available yet"
    return None


def _die_with_parent():
    """Ask the kernel to kill this (about to exec) child if the bench runner dies, so an
    interrupted run leaves no server behind (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _preexec(cpus):
    def run():
        import resource

        _die_with_parent()

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, max(hard, NOFILE)))
        except (ValueError, OSError):  # not allowed to raise the hard limit: up to it
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            except (ValueError, OSError):
                pass
        if cpus:
            try:
                os.sched_setaffinity(0, cpus)
            except OSError:
                pass

    return run


class Server:
    """A running peer serving one handler; its whole process group is killed on stop."""

    def __init__(self, peer, handler, python, cpus, tag=""):
        self.peer = peer
        self.handler = handler
        self.python = python
        self.cpus = cpus
        os.makedirs(os.path.join(OUT, "logs"), exist_ok=True)
        self.log_path = os.path.join(OUT, "logs", "%s-%s%s.log" % (peer.name, handler, tag))
        self.proc = None
        self.port = None
        self.note = None

    @property
    def pid(self):
        return self.proc.pid

    def start(self, timeout=60.0):
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = SERVERS
        env.pop("PYTHONHOME", None)
        logf = open(self.log_path, "wb")
        listener = None
        try:
            if self.peer.launcher == "prefork":
                listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind(("127.0.0.1", 0))
                listener.listen(1024)
                self.port = listener.getsockname()[1]
                env["PYTHONPATH"] = os.pathsep.join([SERVERS, ROOT])
                argv = [self.python, "-m", "spoon.prefork", "--fd", str(listener.fileno()),
                        "--target", "twisted_raw.%s_factory" % self.handler,
                        "--workers", str(self.peer.workers)]
                self.proc = subprocess.Popen(
                    argv, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                    start_new_session=True, pass_fds=(listener.fileno(),),
                    preexec_fn=_preexec(self.cpus),
                )
            else:
                argv = [self.python, os.path.join(SERVERS, self.peer.script), *self.peer.args,
                        "--handler", self.handler]
                self.proc = subprocess.Popen(
                    argv, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=OUT,
                    start_new_session=True, preexec_fn=_preexec(self.cpus),
                )
        finally:
            logf.close()
            if listener is not None:
                listener.close()
        deadline = time.monotonic() + timeout
        if self.port is None:
            self.port = self._wait_ready(deadline)
        self._wait_serving(deadline)
        return self

    def _log_text(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf8", "replace")
        except OSError:
            return ""

    def _wait_ready(self, deadline):
        while time.monotonic() < deadline:
            for line in self._log_text().splitlines():
                if line.startswith("READY "):
                    return int(line.split()[1])
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        self.stop()
        raise RuntimeError("%s (%s) did not start:\n%s" % (self.peer.name, self.handler,
                                                          self._log_text()[-3000:]))

    def _wait_serving(self, deadline):
        """Until a probe request is answered and the expected workers exist."""
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                probe(self.port, self.handler)
                last = None
                if self.peer.workers <= 1 or len(self.pids()) >= 1 + self.peer.workers:
                    return
            except OSError as e:
                last = e
            time.sleep(0.05)
        if self.proc.poll() is None and last is None:
            self.note = "expected %d workers, found %d processes" % (
                self.peer.workers, len(self.pids()))
            return
        self.stop()
        raise RuntimeError("%s (%s) is not serving (%s):\n%s" % (
            self.peer.name, self.handler, last, self._log_text()[-3000:]))

    def pids(self):
        return procstat.tree(self.proc.pid)

    def worker_pids(self):
        pids = self.pids()
        if self.peer.workers > 1 and len(pids) > 1:
            return [p for p in pids if p != self.proc.pid]
        return pids

    def stop(self):
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def probe(port, handler, timeout=5.0):
    """One request of the handler's kind; raises OSError unless it is answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        if handler == "big":
            s.sendall(b"BIG 1 1\nx")
            want = 1
        else:
            s.sendall(b"Probe\n")
            want = 1
        if handler != "pingpong":
            s.shutdown(socket.SHUT_WR)
        got = b""
        while len(got) < want or (handler == "pingpong" and not got.endswith(b"\n")):
            data = s.recv(4096)
            if not data:
                break
            got += data
        if len(got) < want:
            raise OSError("no reply to the probe")
