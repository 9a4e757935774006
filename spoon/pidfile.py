"""A daemon's pid file: written atomically, locked by the daemon, checked before a signal.

A pid file alone cannot tell a running daemon from a process that got the same pid after
the daemon crashed; ``kill $(cat pidfile)`` then hits a stranger.  So the daemon proves
itself twice:

- **The lock.**  The process a pid file names holds a POSIX record lock (``fcntl``,
  ``F_SETLK``) on it for its whole life.  POSIX locks belong to one process: they are not
  inherited by ``fork``, so the lock is taken by the process that serves (after
  :func:`spoon.daemon.detach`'s double fork; the supervisor of a pool, never its workers)
  and the kernel drops it when that process exits, whatever way it exits.  Anyone can ask
  who holds it (``F_GETLK`` gives the holder's pid).  ``flock`` would not do: its lock is
  shared by every process that inherits the descriptor, so workers outliving their
  supervisor would keep it.  (One catch of POSIX locks: a process drops its lock when it
  closes *any* descriptor of the file; this module never opens the pid file in the process
  that holds it.)
- **The identity.**  Beside the pid file, ``PIDFILE.json`` records the pid and its start
  time (``/proc/PID/stat`` field 22, in clock ticks since boot), plus whatever the writer
  adds (``spoon start`` records its class and options there for ``restart``).  A reused pid
  has another start time.

The pid file itself stays a bare pid (``kill $(cat pidfile)``, systemd's ``PIDFile=`` and
spoon 1.0.x read it), and a bare pid file written by an older spoon is still read: without
a recorded identity only the lock can vouch for its process.
"""

import errno
import fcntl
import json
import logging
import os
import struct
import tempfile
import time

__all__ = [
    "PidFileError",
    "Instance",
    "read_pidfile",
    "write_pidfile",
    "remove_pidfile",
    "read_record",
    "record_path",
    "inspect_pidfile",
    "check_pidfile",
    "process_alive",
    "process_start_time",
    "process_age",
    "wait_for_exit",
]


class PidFileError(Exception):
    """The pid file cannot be used: unreadable, not a pid, unwritable, or owned by a live
    process."""


# -- /proc -------------------------------------------------------------------------------------


def _stat_fields(pid):
    """The fields of ``/proc/PID/stat`` after the command name (field 3 onwards), or None
    when there is no such process (or no /proc)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_start_time(pid):
    """When ``pid`` started, in clock ticks since boot (field 22 of /proc/PID/stat); None
    when it does not exist.  Two processes that had the same pid have different values."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def process_age(pid):
    """Seconds since ``pid`` started, or None."""
    start = process_start_time(pid)
    if start is None:
        return None
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return max(0.0, uptime - start / os.sysconf("SC_CLK_TCK"))


def process_alive(pid):
    """True while process ``pid`` exists and is not a zombie (a dead daemon re-parented to
    an init that does not reap stays a zombie, and must count as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, belongs to someone else
    fields = _stat_fields(pid)
    if fields is None:
        return True  # no /proc: kill(0) said it exists
    return fields[0] not in ("Z", "X")


def wait_for_exit(pid, timeout, start_time=None):
    """Wait until ``pid`` has exited, at most ``timeout`` seconds; True when it has.

    With ``start_time`` (see :func:`process_start_time`), a new process that got the same
    pid meanwhile does not count as the one waited for.
    """
    deadline = time.monotonic() + timeout
    delay = 0.005
    while process_alive(pid) and (
        start_time is None or process_start_time(pid) in (None, start_time)
    ):
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
    return True


# -- reading and writing ------------------------------------------------------------------------


def record_path(path):
    """Where the identity record of pid file ``path`` lives: ``path + ".json"``."""
    return path + ".json"


def _parse_pid(text, path):
    text = text.strip()
    if not text:
        return None
    try:
        pid = int(text)
    except ValueError:
        pid = 0
    if pid <= 0:
        raise PidFileError(
            "%s does not hold a pid (%r): remove it or choose another pid file"
            % (path, text[:20])
        )
    return pid


def read_pidfile(path):
    """The pid in ``path``, or None when the file does not exist (or is empty).

    Raises :class:`PidFileError` when it exists but holds something else than a pid: such a
    file is never removed or overwritten, it may not be a pid file at all.
    """
    try:
        with open(path) as f:
            text = f.read(64)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise PidFileError("cannot read the pid file %s: %s" % (path, e.strerror)) from e
    return _parse_pid(text, path)


def read_record(path):
    """The identity record beside pid file ``path`` (a dict: ``pid``, ``start_time`` and
    what the writer added), or None when there is none or it is unreadable."""
    try:
        with open(record_path(path)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


#: Pid files this process wrote for itself, with the descriptor that holds each one's lock.
_held = {}


def held_pidfiles():
    """The pid files this process wrote for itself and still holds (absolute paths)."""
    return list(_held)


def _write_atomically(path, data, lock=False):
    """Write ``data`` to ``path`` through a temporary file renamed over it, so readers see
    the old content or the whole new one.  With ``lock`` the file is locked before it
    appears, and the locked descriptor is returned (else None)."""
    directory, name = os.path.split(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".%s." % name, suffix=".tmp", dir=directory)
    except OSError as e:
        raise PidFileError("cannot write the pid file %s: %s" % (path, e.strerror)) from e
    try:
        try:
            if lock:
                _lock(fd)
            os.write(fd, data)
            os.fchmod(fd, 0o644)
            os.replace(tmp, path)
        except BaseException:
            os.close(fd)
            raise
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise PidFileError("cannot write the pid file %s: %s" % (path, e.strerror)) from e
    if lock:
        return fd
    os.close(fd)
    return None


def _lock(fd):
    """Lock ``fd``'s file for this process; a file system without locks (some network
    file systems) leaves the identity record as the only proof."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            raise


def write_pidfile(path, pid=None, record=None):
    """Write ``pid`` (default: this process) to ``path`` atomically, with its identity
    record (its start time, plus the dict ``record``) beside it.

    When ``pid`` is this process, the pid file is locked before it appears and stays
    locked until this process exits (or :func:`remove_pidfile`).  Raises
    :class:`PidFileError` with a readable message when the location is not writable.
    """
    pid = os.getpid() if pid is None else pid
    path = os.path.abspath(path)
    identity = dict(record or {}, pid=pid, start_time=process_start_time(pid))
    _write_atomically(record_path(path), json.dumps(identity, sort_keys=True).encode() + b"\n")
    mine = pid == os.getpid()
    fd = _write_atomically(path, b"%d\n" % pid, lock=mine)
    old = _held.pop(path, None)
    if old is not None:
        os.close(old)
    if mine:
        _held[path] = fd
    return path


def _names_me(path, pid):
    """True when ``path`` is the pid file of ``pid``.  For a file this process locked, the
    inode answers (opening the file would drop the lock)."""
    fd = _held.get(path)
    if fd is not None and pid == os.getpid():
        try:
            return os.path.samestat(os.fstat(fd), os.stat(path))
        except OSError:
            return False
    try:
        return read_pidfile(path) == pid
    except PidFileError:
        return False


def remove_pidfile(path, pid=None):
    """Remove ``path`` and its identity record if it names ``pid`` (default: this
    process); True if removed.

    Only the owner removes it: a forked worker or a newer instance that rewrote the file
    keeps it.
    """
    pid = os.getpid() if pid is None else pid
    path = os.path.abspath(path)
    if not _names_me(path, pid):
        return False
    record = read_record(path)
    try:
        os.unlink(path)
    except OSError:
        return False
    if record is not None and record.get("pid") == pid:
        try:
            os.unlink(record_path(path))
        except OSError:
            pass
    fd = _held.pop(path, None)
    if fd is not None and pid == os.getpid():
        os.close(fd)
    return True


# -- is the daemon there? --------------------------------------------------------------------


def _lock_holder(fd):
    """The pid of the process holding a POSIX lock on ``fd``'s file, or None (also when
    this process holds it: one's own lock never conflicts)."""
    layout = "hhqqi"  # struct flock: l_type, l_whence, l_start, l_len, l_pid
    try:
        answer = fcntl.fcntl(
            fd, fcntl.F_GETLK, struct.pack(layout, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        )
    except OSError:
        return None
    l_type, _, _, _, l_pid = struct.unpack(layout, answer[: struct.calcsize(layout)])
    return None if l_type == fcntl.F_UNLCK else l_pid


class Instance:
    """What a pid file says about its daemon, checked against its lock and ``/proc``.

    ``state`` is one of:

    - ``RUNNING``: the process named holds the lock, or has the recorded start time;
    - ``ABSENT``: there is no pid file;
    - ``STALE``: the process named is gone, or the pid now belongs to another process;
    - ``UNVERIFIED``: the process named is alive but neither holds the lock nor has a
      recorded identity (a bare pid file: an older spoon's, or not a spoon daemon's);
    - ``FOREIGN``: another process than the one named holds the lock.

    ``reason`` says it in one line; ``pid``, ``start_time`` (of the live process named),
    ``record`` (the identity record, if it is this pid's) and ``holder`` (the lock's) as
    found.  Only a ``RUNNING`` instance may be signalled.
    """

    RUNNING = "running"
    ABSENT = "absent"
    STALE = "stale"
    UNVERIFIED = "unverified"
    FOREIGN = "foreign"

    def __init__(self, path, state, reason, pid=None, start_time=None, record=None,
                 holder=None):
        self.path, self.state, self.reason = path, state, reason
        self.pid, self.start_time, self.record, self.holder = pid, start_time, record, holder

    @property
    def running(self):
        return self.state == self.RUNNING

    def still_running(self):
        """True while the same process (same pid, same start time) is alive."""
        return (
            self.running
            and process_alive(self.pid)
            and process_start_time(self.pid) == self.start_time
        )

    def __repr__(self):
        return "<Instance %s %s pid=%s>" % (self.path, self.state, self.pid)


def inspect_pidfile(path):
    """An :class:`Instance` telling whether the daemon of pid file ``path`` runs.

    Raises :class:`PidFileError` when the file exists but cannot be read or holds no pid.
    """
    path = os.path.abspath(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return Instance(path, Instance.ABSENT, "No pid file available: %s" % path)
    except OSError as e:
        raise PidFileError("cannot read the pid file %s: %s" % (path, e.strerror)) from e
    try:
        # The pid and the lock come from the same open file: a file renamed over the path
        # meanwhile cannot mix one daemon's pid with another's lock.
        pid = _parse_pid(os.read(fd, 64).decode("ascii", "replace"), path)
        holder = _lock_holder(fd)
    finally:
        os.close(fd)
    if pid is None:
        return Instance(path, Instance.ABSENT, "The pid file %s is empty" % path)
    record = read_record(path)
    if record is not None and record.get("pid") != pid:
        record = None  # another daemon's, or a half-finished start's
    start_time = process_start_time(pid) if process_alive(pid) else None
    found = dict(pid=pid, start_time=start_time, record=record, holder=holder)
    recorded = record.get("start_time") if record else None
    if holder is not None and holder != pid:
        return Instance(
            path, Instance.FOREIGN,
            "process %d from %s does not hold its lock: process %d does; not signalled"
            % (pid, path, holder),
            **found,
        )
    if start_time is None:
        return Instance(
            path, Instance.STALE,
            "Process %d from %s is not running (stale pid file)" % (pid, path), **found
        )
    if holder == pid or (recorded is not None and recorded == start_time):
        return Instance(
            path, Instance.RUNNING, "process %d from %s is running" % (pid, path), **found
        )
    if recorded is not None:
        return Instance(
            path, Instance.STALE,
            "Process %d from %s is not running (stale pid file): pid %d now belongs to "
            "another process" % (pid, path, pid),
            **found,
        )
    return Instance(
        path, Instance.UNVERIFIED,
        "process %d from %s neither holds the pid file's lock nor has a recorded identity "
        "(a pid file of an older spoon, or not a spoon daemon's): not signalled"
        % (pid, path),
        **found,
    )


def _remove_stale(instance):
    for name in (instance.path, record_path(instance.path)):
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise PidFileError(
                "cannot remove the stale pid file %s: %s" % (name, e.strerror)
            ) from e


def check_pidfile(path, logger=None):
    """Make ``path`` ready for a new daemon, before anything forks.

    Raises :class:`PidFileError` when its daemon runs (or a live process it names cannot
    be told apart from one), when it does not hold a pid, or cannot be written; removes it
    (and logs it) when stale.
    """
    logger = logger or logging.getLogger("spoon.daemon")
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise PidFileError("cannot write the pid file %s: it is a directory" % path)
    instance = inspect_pidfile(path)
    if instance.state in (Instance.RUNNING, Instance.UNVERIFIED, Instance.FOREIGN):
        detail = "" if instance.running else " (%s)" % instance.reason
        raise PidFileError(
            "already running: %s names live process %d%s" % (path, instance.pid, detail)
        )
    if instance.state == Instance.STALE:
        logger.warning("Removing stale pid file %s (%s)", path, instance.reason)
        _remove_stale(instance)
    # Prove the location is writable now, while failing is still cheap and visible.
    directory, name = os.path.split(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".%s." % name, suffix=".probe", dir=directory)
    except OSError as e:
        raise PidFileError("cannot write the pid file %s: %s" % (path, e.strerror)) from e
    os.close(fd)
    os.unlink(tmp)
    return path
