"""Zero-downtime code upgrade: a new generation of the pool, started from the new code on
the same listening sockets, takes over from the running one.

The running supervisor (the *old generation*), on USR2, executes its own command line
again (``sys.orig_argv``, from the directory it started in) with its listening sockets
left open across the exec and three variables telling the new process what it is:

- ``SPOON_UPGRADE_FDS``: the inherited listening descriptors ("3,4"); a server built in
  the new process for the same address adopts one instead of binding (the old one still
  holds the address, and a client connecting meanwhile is served by one or the other);
- ``SPOON_UPGRADE_READY_FD``: the write end of a pipe back to the old generation;
- ``SPOON_UPGRADE_FROM``: the old supervisor's pid.

The new generation writes ``PID <pid>`` on the pipe as soon as its supervisor runs, then
``READY <pid>`` once every one of its workers serves (after taking over the pid file, if
it has one).  Only then does the old generation stop, gracefully and without refusing
connections at the socket (the new workers accept on it): its workers stop accepting and
finish what is in flight.  If the pipe closes without ``READY`` (the new code does not
import, its workers die before serving) or ``READY`` does not come within
``UPGRADE_TIMEOUT`` seconds, the new generation is stopped, the old one keeps serving, and
the failure is logged once and recorded beside the pid file for ``spoon X upgrade``.

Under twistd the pool service does the same with a new supervisor process of its own
(:meth:`spoon.service.PreforkService.upgrade`); only the ``READY`` line is used there.
"""

import os
import socket
import subprocess
import sys
import time

from spoon import pidfile

__all__ = [
    "ENV_FDS", "ENV_READY_FD", "ENV_FROM", "UPGRADE_TIMEOUT", "Successor", "take_inherited_socket",
    "announce_started", "announce_ready", "announce_failure", "FailureTee", "when_ready", "is_successor", "origin", "upgrade_argv",
    "record_result", "read_result",
]

ENV_FDS = "SPOON_UPGRADE_FDS"
ENV_READY_FD = "SPOON_UPGRADE_READY_FD"
ENV_FROM = "SPOON_UPGRADE_FROM"
#: Seconds the old generation waits for the new one to serve before giving up on it.
UPGRADE_TIMEOUT = 60.0
#: Seconds between TERM and KILL of a new generation that did not come up in time.
ABANDON_GRACE = 10.0

#: Where this process started (the daemon moves to "/"): the new generation's directory,
#: so that a relative script path or a module in the current directory is found again.
STARTUP_DIRECTORY = os.getcwd()


# -- the new generation's side ----------------------------------------------------------------


class _Inheritance:
    """What this process was handed by the generation before it (read once from the
    environment, which is cleaned so that workers and a later upgrade do not see it)."""

    def __init__(self, environ):
        fds = environ.pop(ENV_FDS, "")
        ready = environ.pop(ENV_READY_FD, "")
        origin = environ.pop(ENV_FROM, "")
        self.sockets = []
        for text in fds.split(","):
            if text.strip().isdigit():
                try:
                    sock = socket.socket(fileno=int(text))
                except OSError:
                    continue
                sock.set_inheritable(False)  # passed on again only by a later upgrade
                self.sockets.append(sock)
        self.ready_fd = int(ready) if ready.strip().isdigit() else None
        if self.ready_fd is not None:
            try:
                os.set_inheritable(self.ready_fd, False)
            except OSError:
                self.ready_fd = None
        self.origin = int(origin) if origin.strip().isdigit() else None
        self.callbacks = []
        self.announced = False

    def take(self, family, type_, address):
        for sock in self.sockets:
            if sock.type != type_:
                continue
            if family is None:  # a socket systemd passed: the old generation's, as it is
                self.sockets.remove(sock)
                return sock
            if sock.family != family:
                continue
            if _same_address(sock.getsockname(), address, family):
                self.sockets.remove(sock)
                return sock
        return None

    def write(self, line):
        if self.ready_fd is None:
            return
        try:
            os.write(self.ready_fd, line.encode("ascii") + b"\n")
        except OSError:
            pass

    def close(self):
        if self.ready_fd is not None:
            try:
                os.close(self.ready_fd)
            except OSError:
                pass
            self.ready_fd = None
        for sock in self.sockets:  # inherited, but this generation serves other addresses
            sock.close()
        del self.sockets[:]


_inheritance = _Inheritance(os.environ) if ENV_FDS in os.environ or ENV_READY_FD in os.environ else None

if _inheritance is not None:
    _previous_excepthook = sys.excepthook

    def _announce_uncaught(kind, value, tb):
        """A new generation that dies of an exception before serving says which."""
        announce_failure("%s: %s" % (kind.__name__, value))
        _previous_excepthook(kind, value, tb)

    sys.excepthook = _announce_uncaught


def _same_address(bound, wanted, family):
    if family == socket.AF_UNIX:
        return os.fsdecode(bound) == os.fsdecode(wanted)
    if isinstance(wanted, (str, bytes)) or len(wanted) < 2:
        return False
    host, port = wanted[0], int(wanted[1])
    if port not in (0, bound[1]):
        return False
    try:
        wanted_ip = socket.getaddrinfo(host or None, None, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)[0][4][0]
    except (OSError, IndexError):
        return False
    return socket.inet_pton(family, wanted_ip.split("%")[0]) == socket.inet_pton(family, bound[0].split("%")[0])


def is_successor():
    """True in a new generation started by an upgrade (until it announced it serves)."""
    return _inheritance is not None and not _inheritance.announced


def origin():
    """The pid of the generation this one takes over from (None outside an upgrade)."""
    return _inheritance.origin if _inheritance is not None else None


def take_inherited_socket(family, type_, address):
    """The listening socket the previous generation handed down for ``address`` (and the
    same family and type), or None: bind as usual.  Port 0 matches the inherited port;
    ``family`` None (a ``systemd:`` endpoint, whose socket systemd passed to the first
    generation only) takes the first inherited socket of that type."""
    if _inheritance is None:
        return None
    return _inheritance.take(family, type_, address)


def when_ready(callback):
    """Run ``callback()`` in a new generation once its pool serves, just before the old
    generation is told (the daemon takes over the pid file there).  Outside an upgrade,
    nothing."""
    if _inheritance is not None and not _inheritance.announced:
        _inheritance.callbacks.append(callback)


def announce_started(pid):
    """The new generation's supervisor runs (its pid, which a daemon's double fork
    changed): the old one can stop it if it never becomes ready."""
    if _inheritance is not None and not _inheritance.announced:
        _inheritance.write("PID %d" % pid)


def announce_failure(text):
    """The new generation cannot start: tell the old one why (its output may go nowhere:
    a daemon's is /dev/null), in one line."""
    if _inheritance is not None and not _inheritance.announced:
        line = " ".join(str(text).split())[:2000]
        _inheritance.write("FAILED %s" % line)


class FailureTee:
    """A text stream that writes through to ``stream`` and keeps what was written, for
    :func:`announce_failure` when a command line ends in an error."""

    def __init__(self, stream):
        self.stream = stream
        self.text = []

    def write(self, text):
        self.text.append(text)
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()

    def announce(self):
        if self.text:
            announce_failure("".join(self.text))


def announce_ready(pid, log=None):
    """Every worker of the new generation serves: run the :func:`when_ready` callbacks,
    then tell the old generation, which stops.  Returns False when a callback failed
    (the pid file could not be taken over, say): the old generation is told why and
    serves on, and this one must stop (it is still a successor: its stop leaves the
    shared socket alone)."""
    inheritance = _inheritance
    if inheritance is None or inheritance.announced:
        return True
    for callback in inheritance.callbacks:
        try:
            callback()
        except Exception as e:
            if log is not None:
                log.exception("Taking over from generation %s failed", inheritance.origin)
            announce_failure("taking over failed: %s: %s" % (type(e).__name__, e))
            inheritance.close()
            return False
    inheritance.announced = True
    inheritance.write("READY %d" % pid)
    inheritance.close()
    if log is not None and inheritance.origin:
        log.info("Upgrade: this generation serves; generation %d stops", inheritance.origin)
    return True


# -- the old generation's side ----------------------------------------------------------------


def upgrade_argv():
    """The command line that started this process, to be run again with the new code."""
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable] + sys.argv)
    argv[0] = sys.executable
    return argv


class Successor:
    """The new generation, seen from the old one: started by :meth:`start`, then fed what
    it writes with :meth:`feed` (from the supervisor's poll on :attr:`fd`) until it is
    ready or failed.  ``clock`` is the supervisor's."""

    def __init__(self, process, fd, started, clock, timeout):
        self.process = process
        self.fd = fd
        self.started = started
        self.clock = clock
        self.timeout = timeout
        self.pid = process.pid
        self.state = "starting"  # "ready" or "failed" at the end
        self.reason = None
        self._buffer = b""
        self._abandoned_at = None
        #: What the new generation said of its failure (``FAILED ...``), if anything.
        self.said = None

    @classmethod
    def start(cls, sockets, clock, timeout=UPGRADE_TIMEOUT, argv=None, env=None):
        """Execute ``argv`` (default: :func:`upgrade_argv`) with ``sockets`` inherited;
        raises OSError when it cannot be started."""
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        fds = [s.fileno() for s in sockets]
        environ = dict(os.environ if env is None else env)
        environ[ENV_FDS] = ",".join(str(fd) for fd in fds)
        environ[ENV_READY_FD] = str(write_fd)
        environ[ENV_FROM] = str(os.getpid())
        try:
            process = subprocess.Popen(
                argv or upgrade_argv(), env=environ, cwd=STARTUP_DIRECTORY, pass_fds=fds + [write_fd],
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        os.set_blocking(read_fd, False)
        return cls(process, read_fd, clock(), clock, timeout)

    def feed(self):
        """Read what the new generation wrote; returns the new state."""
        while self.fd is not None:
            try:
                data = os.read(self.fd, 4096)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                self._close()
                if self.state == "starting":
                    self._fail(self._exit_text("closed its pipe before serving"))
                break
            self._buffer += data
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                if line.startswith(b"FAILED "):
                    self.said = line[7:].decode("utf-8", "replace")
                    continue
                words = line.split()
                if len(words) == 2 and words[1].isdigit():
                    if words[0] == b"PID":
                        self.pid = int(words[1])
                    elif words[0] == b"READY" and self.state == "starting":
                        self.pid = int(words[1])
                        self.state = "ready"
        self._reap()
        return self.state

    def check_time(self):
        """Give up on a new generation that did not serve within the timeout: TERM it,
        KILL it ``ABANDON_GRACE`` seconds later; returns the state."""
        now = self.clock()
        if self.state == "starting" and now - self.started > self.timeout:
            self._fail("did not serve within %ss" % self.timeout)
            self._abandoned_at = now
            self._signal(15)
        elif self._abandoned_at is not None and now - self._abandoned_at > ABANDON_GRACE:
            self._abandoned_at = None
            self._signal(9)
        self._reap()
        return self.state

    def seconds_left(self):
        if self.state != "starting":
            return None
        return max(0.0, self.started + self.timeout - self.clock())

    def _signal(self, signum):
        for pid in {self.pid, self.process.pid}:
            try:
                os.kill(pid, signum)
            except OSError:
                pass

    def _reap(self):
        try:
            self.process.poll()
        except OSError:
            pass

    def _exit_text(self, what):
        self._reap()
        code = self.process.returncode
        if code is None:
            return what
        if code < 0:
            return "%s (killed by signal %d)" % (what, -code)
        return "%s (exit status %d)" % (what, code)

    def _fail(self, reason):
        self.state = "failed"
        self.reason = reason + (": " + self.said if self.said else "")
        self._close()

    def _close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def stop(self):
        """The old generation stops before the new one served: the new one stops too
        (KILLed ``ABANDON_GRACE`` seconds later if still there: :meth:`check_time`)."""
        if self.state == "starting":
            self._fail("stopped with the old generation")
            self._abandoned_at = self.clock()
            self._signal(15)
        self._close()

    def exited(self):
        """True once the process this generation started has exited (and is reaped)."""
        self._reap()
        return self.process.returncode is not None

    def abandon(self):
        """The old generation is going away: stop waiting (the new one is left to live or
        die on its own)."""
        self._close()


def record_result(result, reason=None, now=None):
    """Write the outcome of the last upgrade into the identity record of every pid file
    this process holds, where ``spoon X upgrade`` looks for it."""
    for path in pidfile.held_pidfiles():
        record = pidfile.read_record(path) or {}
        record.pop("pid", None)
        record.pop("start_time", None)
        record["upgrade"] = {"result": result, "reason": reason, "time": now or time.time()}
        try:
            pidfile.write_pidfile(path, record=record)
        except pidfile.PidFileError:
            pass


def read_result(path):
    """The ``upgrade`` entry of ``path``'s identity record (None if there is none)."""
    record = pidfile.read_record(path)
    return record.get("upgrade") if isinstance(record, dict) else None
