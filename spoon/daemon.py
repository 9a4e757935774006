"""Run a spoon server as a Unix daemon and control it through its pid file.

The original's surface, unchanged: :func:`detach`, :func:`run_daemon`, :func:`send_action`
and the command line ``python -m spoon.daemon KLASS start|stop|reload|restart`` (also
installed as the ``spoon`` console script).

What this version adds, and why:

- ``start`` returns only once the daemon has written its pid file (the first parent waits
  for a word from the daemon over a pipe), so ``start && cat pidfile`` works and a failure
  of the daemon's set-up reaches the terminal with a non-zero exit status.
- Everything that can fail is checked before anything forks: the server class, the pid file
  (a live owner refuses the start, a stale one is removed, an unwritable location is
  reported), the log file, Sentry, and the listening port (the server binds in its
  constructor).
- The pid file is written atomically (a temporary file renamed over it), so a reader never
  sees a half-written pid, and it is removed only by the process it names: a pre-forked
  worker leaving ``serve_forever`` cannot delete its master's pid file.
- ``stop`` and ``restart`` wait (bounded) for the old process to exit; the original's
  ``restart`` raced the old process, and its ``start`` without ``-s`` crashed.
"""

import argparse
import logging
import os
import select
import signal
import sys
import tempfile
import time

from spoon import targets

__all__ = [
    "detach",
    "run_daemon",
    "send_action",
    "write_pidfile",
    "read_pidfile",
    "remove_pidfile",
    "process_alive",
    "wait_for_exit",
    "load_server_class",
    "PidFileError",
    "main",
]

log = logging.getLogger("spoon.daemon")

#: Seconds the first parent of :func:`detach` waits for the daemon to report that it is set
#: up; only file operations happen meanwhile, so this is a bound for a broken machine.
DETACH_REPORT_TIMEOUT = 60.0


class PidFileError(Exception):
    """The pid file cannot be used: unreadable, not a pid, unwritable, or owned by a live
    process."""


class UsageError(Exception):
    """A mistake on the command line or in the server class: exit status 2."""


# -- pid files -------------------------------------------------------------------------------


def process_alive(pid):
    """True while process ``pid`` exists and is not a zombie (a dead daemon re-parented to
    an init that does not reap stays a zombie, and must count as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, belongs to someone else
    try:
        with open("/proc/%d/stat" % pid) as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc: kill(0) said it exists
    return state not in ("Z", "X")


def wait_for_exit(pid, timeout):
    """Wait until ``pid`` has exited, at most ``timeout`` seconds; True when it has."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while process_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
    return True


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


def write_pidfile(path, pid=None):
    """Write ``pid`` (default: this process) to ``path`` atomically.

    The pid goes to a temporary file in the same directory that is then renamed over
    ``path``, so readers see either the old content or the whole new pid.  Raises
    :class:`PidFileError` with a readable message when the location is not writable.
    """
    pid = os.getpid() if pid is None else pid
    path = os.path.abspath(path)
    directory, name = os.path.split(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".%s." % name, suffix=".tmp", dir=directory)
    except OSError as e:
        raise PidFileError("cannot write the pid file %s: %s" % (path, e.strerror)) from e
    try:
        try:
            os.write(fd, b"%d\n" % pid)
            os.fchmod(fd, 0o644)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise PidFileError("cannot write the pid file %s: %s" % (path, e.strerror)) from e
    return path


def remove_pidfile(path, pid=None):
    """Remove ``path`` if it names ``pid`` (default: this process); True if removed.

    Only the owner removes it: a forked worker or a newer instance that rewrote the file
    keeps it.
    """
    pid = os.getpid() if pid is None else pid
    try:
        if read_pidfile(path) != pid:
            return False
        os.unlink(path)
    except (OSError, PidFileError):
        return False
    return True


def check_pidfile(path, logger=None):
    """Make ``path`` ready for a new daemon, before anything forks.

    Raises :class:`PidFileError` when it names a live process, does not hold a pid, or
    cannot be written; removes it (and logs it) when it names a dead process.
    """
    logger = logger or log
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise PidFileError("cannot write the pid file %s: it is a directory" % path)
    pid = read_pidfile(path)
    if pid is not None:
        if process_alive(pid):
            raise PidFileError("already running: %s names live process %d" % (path, pid))
        logger.warning("Removing stale pid file %s (process %d is gone)", path, pid)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise PidFileError(
                "cannot remove the stale pid file %s: %s" % (path, e.strerror)
            ) from e
    # Prove the location is writable now, while failing is still cheap and visible.
    directory, name = os.path.split(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".%s." % name, suffix=".probe", dir=directory)
    except OSError as e:
        raise PidFileError("cannot write the pid file %s: %s" % (path, e.strerror)) from e
    os.close(fd)
    os.unlink(tmp)
    return path


# -- daemonising -----------------------------------------------------------------------------


def _flush_everything():
    """Flush what a fork would otherwise write twice (once per process)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, ValueError, OSError):
            pass
    for handler in list(logging.getLogger().handlers):
        try:
            handler.flush()
        except Exception:
            pass


def _read_report(fd, timeout):
    """Everything the daemon wrote on the report pipe until it closed it (bounded)."""
    deadline = time.monotonic() + timeout
    chunks = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            ready, _, _ = select.select([fd], [], [], remaining)
        except InterruptedError:
            continue
        if not ready:
            break
        data = os.read(fd, 4096)
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks).decode("utf8", "replace")


def _redirect(fd, path, flags):
    target = os.open(path, flags, 0o644)
    if target != fd:
        os.dup2(target, fd)
        os.close(target)


def detach(stdout="/dev/null", stderr=None, stdin="/dev/null", pidfile=None, logger=None):
    """Turn this process into a daemon: fork twice, ``setsid``, ``chdir("/")``, redirect
    the standard streams to the given paths (``stderr`` defaults to ``stdout``), write
    ``pidfile``.

    Returns in the daemon only.  The calling process waits until the daemon reports that
    its set-up is done and exits with status 0, or prints the daemon's error and exits
    with status 1; so a shell running it sees success only when the pid file is there.
    Relative paths are taken from the current directory, before the ``chdir``.  The umask
    is left as the caller set it.
    """
    logger = logger or log
    stdout = os.path.abspath(stdout)
    stderr = os.path.abspath(stderr) if stderr else stdout
    stdin = os.path.abspath(stdin)
    pidfile = os.path.abspath(pidfile) if pidfile else None
    _flush_everything()
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid > 0:
        # The caller: wait for the daemon's word, then leave without running the caller's
        # clean-up (atexit, finally blocks): those belong to the daemon now.
        os.close(report_w)
        report = _read_report(report_r, DETACH_REPORT_TIMEOUT)
        os.close(report_r)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        if report.startswith("OK"):
            os._exit(0)
        message = report[4:].strip() if report.startswith("ERR") else (
            "the daemon did not report that it was set up"
        )
        os.write(2, ("cannot start the daemon: %s\n" % message).encode("utf8", "replace"))
        os._exit(1)

    os.close(report_r)
    try:
        os.setsid()
        if os.fork() > 0:
            # The session leader leaves, so the daemon can never acquire a terminal.
            os._exit(0)
        os.chdir("/")
        _redirect(0, stdin, os.O_RDONLY)
        _redirect(1, stdout, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        _redirect(2, stderr, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        if pidfile:
            write_pidfile(pidfile)
    except BaseException as e:
        text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        if isinstance(e, OSError) and getattr(e, "filename", None):
            text = "%s: %s" % (e.filename, text)
        try:
            logger.error("Daemon set-up failed: %s", text)
            os.write(report_w, ("ERR %s" % text).encode("utf8", "replace"))
        finally:
            os._exit(1)
    logger.debug("Detached: daemon pid %d", os.getpid())
    os.write(report_w, b"OK %d" % os.getpid())
    os.close(report_w)


def _serve(server, pidfile, daemonize, after_detach=None, serve=None):
    # Taken now: the daemon changes directory to "/".
    pidfile = os.path.abspath(pidfile) if pidfile else None
    if daemonize:
        detach(pidfile=pidfile, logger=getattr(server, "log", None))
    elif pidfile:
        write_pidfile(pidfile)
    owner = os.getpid()
    try:
        if after_detach is not None:
            after_detach()
        (serve or server.serve_forever)()
    except Exception:
        logger = getattr(server, "log", None) or log
        logger.exception("The server stopped on an error")
        raise
    finally:
        if pidfile and os.getpid() == owner:
            remove_pidfile(pidfile, owner)


def run_daemon(server, pidfile, daemonize=True):
    """Run ``server`` (a Spoon or Spork) until it stops, as a daemon unless ``daemonize``
    is false.

    ``pidfile`` (may be None) receives the daemon's pid and is removed on the way out,
    also when ``serve_forever`` raises.  With ``daemonize`` the calling process exits once
    the daemon is set up (see :func:`detach`).
    """
    _serve(server, pidfile, daemonize)


_SIGNALS = {"stop": ("signal_shutdown", signal.SIGTERM), "reload": ("signal_reload", signal.SIGUSR1)}


def send_action(action, pidfile, logger=None, klass=None):
    """Send ``action`` to the daemon named in ``pidfile``: "stop" (SIGTERM) or "reload"
    (SIGUSR1), or the server class's ``signal_shutdown``/``signal_reload`` when ``klass``
    is given.

    Returns the pid signalled, or None when there is none: a missing pid file, a pid file
    that does not hold a pid, or a dead process are logged, not raised.
    """
    logger = logger or log
    if action not in _SIGNALS:
        raise ValueError("unknown action %r: use 'stop' or 'reload'" % (action,))
    attribute, default = _SIGNALS[action]
    signum = getattr(klass, attribute, None) if klass is not None else None
    if signum is None:
        signum = default
    try:
        pid = read_pidfile(pidfile)
    except PidFileError as e:
        logger.error("%s", e)
        return None
    if pid is None:
        logger.warning("No pid file available: %s", pidfile)
        return None
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        logger.warning("Process %d from %s is not running (stale pid file)", pid, pidfile)
        return None
    except PermissionError:
        logger.error("Not allowed to signal process %d from %s", pid, pidfile)
        return None
    logger.info("Sent %s to process %d (%s)", signal.Signals(signum).name, pid, action)
    return pid


# -- the command line ------------------------------------------------------------------------


def load_server_class(path):
    """Import the spoon server class named by a dotted ``path`` ("package.module.Class").

    Raises :class:`UsageError` naming the path when it cannot be imported or is not a
    spoon server class.
    """
    try:
        return targets.server_class(path)
    except targets.TargetError as e:
        raise UsageError(str(e)) from e


def _parser(prog):
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Start, stop, reload or restart a spoon server as a daemon. Options "
        "left out take their value from KLASS.command_line_defaults.",
    )
    parser.add_argument("klass", metavar="KLASS", help="dotted path of the server class")
    parser.add_argument("command", choices=["start", "stop", "reload", "restart"])
    parser.add_argument(
        "-s", "--spork", type=int, default=None, metavar="N",
        help="pre-fork N worker processes (default: the class's prefork for Sporks, "
        "1 for Spoons)",
    )
    parser.add_argument("-p", "--pid-file", default=None, help="the daemon's pid file")
    parser.add_argument("-P", "--port", type=int, default=None, help="port to listen on")
    parser.add_argument("-I", "--interface", default=None, help="address to listen on")
    parser.add_argument(
        "-n", "--nice", type=int, default=None, help="'nice' increment (default 10)"
    )
    parser.add_argument("-d", "--debug", action="store_true", help="log debug records")
    parser.add_argument("-i", "--info", action="store_true", help="show info records on stderr")
    parser.add_argument(
        "-L", "--log-file", default=None,
        help="log file, reopened when logrotate moves it away",
    )
    parser.add_argument(
        "-S", "--sentry-dsn", default=None,
        help="report warnings and errors to this Sentry DSN (needs sentry-sdk)",
    )
    parser.add_argument(
        "-D", "--no-daemon", action="store_true", help="stay in the foreground"
    )
    parser.add_argument(
        "--stop-timeout", type=float, default=None, metavar="SECONDS",
        help="how long stop and restart wait for the old process "
        "(default: the class's graceful_timeout + 10)",
    )
    return parser


def _resolve(options, klass):
    """Fill the options left out from the class's command_line_defaults."""
    defaults = dict(getattr(klass, "command_line_defaults", None) or {})
    for name, fallback in (
        ("port", 5000),
        ("interface", "::0"),
        ("pid_file", None),
        ("log_file", None),
        ("sentry_dsn", None),
        ("spork", None),
        ("nice", 10),
    ):
        if getattr(options, name) is None:
            value = defaults.get(name)
            setattr(options, name, fallback if value is None else value)
    if options.stop_timeout is None:
        options.stop_timeout = float(getattr(klass, "graceful_timeout", 30) or 0) + 10.0
    if options.spork is not None:
        options.spork = int(options.spork)
        if options.spork < 1:
            raise UsageError("-s/--spork must be at least 1, not %d" % options.spork)
    if options.pid_file:
        options.pid_file = os.path.abspath(options.pid_file)
    if options.log_file:
        options.log_file = os.path.abspath(options.log_file)
    return options


def _start(options, klass, out):
    from spoon import logs

    # Everything that can fail is tried before anything forks.
    if options.sentry_dsn and not logs.sentry_available():
        raise UsageError(str(logs.SentryMissing()))
    daemonize = not options.no_daemon
    if daemonize and not options.pid_file:
        raise UsageError(
            "starting a daemon needs a pid file: give -p/--pid-file (or set pid_file in "
            "command_line_defaults), or stay in the foreground with -D"
        )
    level = logging.DEBUG if options.debug else logging.INFO
    stream_level = logging.DEBUG if options.debug else (
        logging.INFO if options.info or (not daemonize and not options.log_file)
        else logging.WARNING
    )
    handlers = logs.setup_logging(
        level=level, log_file=options.log_file, stream=sys.stderr, stream_level=stream_level
    )
    terminal = handlers[-1]
    if options.pid_file:
        check_pidfile(options.pid_file)
    if options.nice:
        os.nice(options.nice)
    workers = options.spork
    if workers is not None and targets.is_spork(klass):
        klass.prefork = workers
    server = klass((options.interface, options.port))
    serve = None
    if workers is not None and targets.is_spork(klass):
        server.prefork = workers
    elif workers is not None and workers > 1:
        # A Spoon class pre-forked on request, as ``twistd spoon --spork N`` does: the
        # same supervisor, around this server's socket.
        def serve_pool():
            from spoon.prefork import Supervisor

            Supervisor(server, workers=workers).run()

        serve = serve_pool
    elif targets.is_spork(klass):
        workers = server.prefork

    def after_detach():
        if daemonize:
            # stderr is /dev/null now: the terminal's handler has nothing left to do.
            logs.remove_handler(terminal)
        if options.sentry_dsn:
            logs.setup_sentry(options.sentry_dsn)
        host, port = server.server_address[:2]
        server.log.info(
            "Starting %s on %s (pid %d%s)",
            options.klass,
            "[%s]:%s" % (host, port) if ":" in str(host) else "%s:%s" % (host, port),
            os.getpid(),
            ", %s workers" % workers if workers and workers > 1 else "",
        )

    try:
        _serve(server, options.pid_file, daemonize, after_detach, serve)
    finally:
        server.server_close()
    return 0


def main(argv=None):
    """The ``spoon`` / ``python -m spoon.daemon`` command line; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    program = os.path.basename(sys.argv[0] or "spoon")
    prog = "python -m spoon.daemon" if program in ("daemon.py", "__main__.py", "-c") else program
    options = _parser(prog).parse_args(argv)
    out = sys.stderr
    # Like twistd: the server's module may live in the current directory.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        klass = load_server_class(options.klass)
        _resolve(options, klass)
        if options.command in ("stop", "reload", "restart") and not options.pid_file:
            raise UsageError(
                "%s needs the pid file: give -p/--pid-file (or set pid_file in "
                "command_line_defaults)" % options.command
            )
        if options.command == "reload":
            if send_action("reload", options.pid_file, logger=_cli_logger(out), klass=klass) is None:
                return 1
            return 0
        if options.command == "stop":
            return 0 if _stop_cli(options, klass, out) else 1
        if options.command == "restart":
            if not _stop_cli(options, klass, out):
                return 1
        return _start(options, klass, out)
    except UsageError as e:
        out.write("%s: error: %s\n" % (prog, e))
        return 2
    except PidFileError as e:
        out.write("%s: %s\n" % (prog, e))
        return 1
    except OSError as e:
        # A busy port ("cannot listen on ...") or an unwritable log file.
        if e.filename:
            text = "%s: %s" % (e.filename, e.strerror)
        else:
            text = e.strerror or str(e)
        out.write("%s: %s\n" % (prog, text))
        return 1


def _cli_logger(out):
    """A logger that tells the person at the terminal what send_action did."""
    logger = logging.getLogger("spoon.daemon.cli")
    if not logger.handlers:
        handler = logging.StreamHandler(out)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def _stop_cli(options, klass, out):
    logger = _cli_logger(out)
    pid = send_action("stop", options.pid_file, logger=logger, klass=klass)
    if pid is None:
        return True
    if not wait_for_exit(pid, options.stop_timeout):
        out.write(
            "process %d did not exit within %ss of the stop signal\n"
            % (pid, options.stop_timeout)
        )
        return False
    logger.info("Process %d has exited", pid)
    return True


if __name__ == "__main__":
    sys.exit(main())
