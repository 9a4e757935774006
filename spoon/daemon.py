"""Run a spoon server as a Unix daemon and control it through its pid file.

The original's surface, unchanged: :func:`detach`, :func:`run_daemon`, :func:`send_action`
and the command line ``python -m spoon.daemon KLASS start|stop|reload|restart`` (also
installed as the ``spoon`` console script), plus ``status``.

What this version adds, and why:

- ``start`` returns only once the daemon has written its pid file (the first parent waits
  for a word from the daemon over a pipe), so ``start && cat pidfile`` works and a failure
  of the daemon's set-up reaches the terminal with a non-zero exit status.
- Everything that can fail is checked before anything forks: the server class, the pid file
  (a running daemon refuses the start, a stale file is removed, an unwritable location is
  reported), the log file, Sentry, the user to switch to, and the listening port (the
  server binds in its constructor).
- The daemon locks its pid file and records its identity beside it (see
  :mod:`spoon.pidfile`): ``stop``, ``reload``, ``restart`` and ``status`` act on the
  process only when it is the daemon that wrote the file, never on a process that got its
  pid later.
- ``start`` records its options beside the pid file, and ``restart`` reuses them unless
  given again: a restart keeps the log file, port, workers... of the running instance.
- ``stop`` and ``restart`` wait (bounded) for the old process to exit; the original's
  ``restart`` raced the old process, and its ``start`` without ``-s`` crashed.
- ``upgrade`` deploys new code without refusing a connection (a pool only): USR2 makes
  the daemon start a new generation of itself on the same socket (see
  :mod:`spoon.pool.upgrade`); the command returns 0 once the new one holds the pid file,
  1 when the old one reports that the new one failed (and keeps serving).
"""

import argparse
import logging
import os
import select
import signal
import sys
import time

from spoon import config, logs, targets
from spoon.pool import upgrade
from spoon.net import bind_socket, format_address, parse_socket_endpoint, socket_options
from spoon.pidfile import (
    Instance,
    PidFileError,
    check_pidfile,
    inspect_pidfile,
    process_age,
    process_alive,
    read_pidfile,
    record_path,
    remove_pidfile,
    wait_for_exit,
    write_pidfile,
)

__all__ = [
    "detach",
    "run_daemon",
    "send_action",
    "report_status",
    "write_pidfile",
    "read_pidfile",
    "remove_pidfile",
    "inspect_pidfile",
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


class UsageError(Exception):
    """A mistake on the command line or in the server class: exit status 2."""


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


def detach(stdout="/dev/null", stderr=None, stdin="/dev/null", pidfile=None, logger=None,
           record=None):
    """Turn this process into a daemon: fork twice, ``setsid``, ``chdir("/")``, redirect
    the standard streams to the given paths (``stderr`` defaults to ``stdout``), write
    ``pidfile`` (locked by the daemon, its identity and the dict ``record`` beside it: see
    :func:`spoon.pidfile.write_pidfile`).

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
            # Here, after the last fork: the lock belongs to the process that serves.
            write_pidfile(pidfile, record=record)
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


def _serve(server, pidfile, daemonize, after_detach=None, serve=None, record=None):
    # Taken now: the daemon changes directory to "/".
    pidfile = os.path.abspath(pidfile) if pidfile else None
    # A new generation of a code upgrade takes the pid file over only once it serves (the
    # old generation holds it until then, and keeps it if this one fails).
    takes_over = pidfile and upgrade.is_successor()
    if takes_over:
        upgrade.when_ready(lambda: write_pidfile(pidfile, record=record))
    if daemonize:
        detach(pidfile=None if takes_over else pidfile, logger=getattr(server, "log", None),
               record=record)
    elif pidfile and not takes_over:
        write_pidfile(pidfile, record=record)
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

    ``pidfile`` (may be None) receives the daemon's pid, is locked while it serves, and is
    removed on the way out, also when ``serve_forever`` raises.  With ``daemonize`` the
    calling process exits once the daemon is set up (see :func:`detach`).
    """
    _serve(server, pidfile, daemonize)


_SIGNALS = {"stop": ("signal_shutdown", signal.SIGTERM), "reload": ("signal_reload", signal.SIGUSR1)}


def _refuse(instance, logger):
    """Say in one line why ``instance`` is not signalled: a missing or stale pid file is a
    warning (nothing runs), a live process that is not proven to be the daemon an error."""
    level = logging.WARNING if instance.state in (Instance.ABSENT, Instance.STALE) else (
        logging.ERROR
    )
    logger.log(level, "%s", instance.reason)


def _send(instance, signum, logger):
    """Signal ``instance``'s process if it is still the one inspected; its pid or None.

    Where the kernel has pidfds, the process is pinned first and checked after, so that
    even a pid reused between the check and the signal cannot receive it.
    """
    pid = instance.pid
    pidfd = None
    try:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise
        except (AttributeError, OSError):
            pass  # no pidfd here: kill(2) right after the check
        if not instance.still_running():
            raise ProcessLookupError(pid)
        if pidfd is None:
            os.kill(pid, signum)
        else:
            signal.pidfd_send_signal(pidfd, signum)
    except ProcessLookupError:
        logger.warning("Process %d from %s is not running (stale pid file)", pid, instance.path)
        return None
    except PermissionError:
        logger.error("Not allowed to signal process %d from %s", pid, instance.path)
        return None
    finally:
        if pidfd is not None:
            os.close(pidfd)
    return pid


def _act(action, pidfile, logger, klass):
    """(instance, pid signalled or None) for ``action`` on ``pidfile``'s daemon."""
    if action not in _SIGNALS:
        raise ValueError("unknown action %r: use 'stop' or 'reload'" % (action,))
    attribute, default = _SIGNALS[action]
    signum = getattr(klass, attribute, None) if klass is not None else None
    if signum is None:
        signum = default
    try:
        instance = inspect_pidfile(pidfile)
    except PidFileError as e:
        logger.error("%s", e)
        return None, None
    if not instance.running:
        _refuse(instance, logger)
        return instance, None
    pid = _send(instance, signum, logger)
    if pid is not None:
        logger.info("Sent %s to process %d (%s)", signal.Signals(signum).name, pid, action)
    return instance, pid


def send_action(action, pidfile, logger=None, klass=None):
    """Send ``action`` to the daemon named in ``pidfile``: "stop" (SIGTERM) or "reload"
    (SIGUSR1), or the server class's ``signal_shutdown``/``signal_reload`` when ``klass``
    is given.

    Only a process proven to be the daemon that wrote the pid file is signalled: it holds
    the pid file's lock, or has the start time recorded beside it.  Returns the pid
    signalled, or None when there is none: a missing pid file, a pid file that does not
    hold a pid, a dead process, or a process not proven to be the daemon are logged, not
    raised.
    """
    return _act(action, pidfile, logger or log, klass)[1]


def _duration(seconds):
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    text = "%02d:%02d:%02d" % (seconds // 3600, seconds // 60 % 60, seconds % 60)
    return "%dd %s" % (days, text) if days else text


#: Seconds after which a status file not rewritten means a stuck supervisor.
STATUS_STALE_AFTER = 5.0

#: ``spoon status`` exit codes, for monitoring checks.
HEALTHY, DEGRADED, DOWN = 0, 1, 2


def pool_health(status, now):
    """``(exit code, reason)`` of a pool from its status snapshot."""
    supervisor = status.get("supervisor", {})
    rows = status.get("workers", [])
    serving = sum(1 for row in rows if row.get("state") == "serving")
    wanted = supervisor.get("workers_wanted", 0)
    stale = now - supervisor.get("written_at", 0)
    if stale > STATUS_STALE_AFTER:
        return DEGRADED, "the supervisor has not updated its status for %ds" % stale
    if serving == 0:
        return DOWN, "no worker serving"
    if serving < wanted:
        return DEGRADED, "%d of %d workers serving" % (serving, wanted)
    late = [str(row["pid"]) for row in rows if row.get("state") == "late"]
    if late:
        return DEGRADED, "late heartbeat: worker %s" % ", ".join(late)
    return HEALTHY, "%d of %d workers serving" % (serving, wanted)


def _size(n):
    for unit in ("B", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return "%d%s" % (n, unit) if unit == "B" else "%.1f%s" % (n, unit)
        n /= 1024.0


def _status_table(status, now):
    supervisor = status["supervisor"]
    totals = status.get("totals", {})
    header = ("ROLE", "PID", "AGE", "STATE", "CONNS", "REQUESTS", "ERRORS", "RSS", "BEAT", "GEN")
    lines = [header, (
        "supervisor", supervisor["pid"], _duration(supervisor["age"]), supervisor["state"],
        totals.get("connections_open", 0), totals.get("requests_finished", 0),
        totals.get("errors", 0), "-", "%.1fs" % (now - supervisor["written_at"]), "-",
    )]
    for row in status.get("workers", []):
        beat = row.get("heartbeat_age")
        lines.append((
            "worker %d" % row["worker"], row["pid"], _duration(row["age"]), row["state"],
            row["connections_open"], row["requests_finished"], row["errors"],
            _size(row.get("rss_bytes", 0)), "-" if beat is None else "%.1fs" % beat,
            row["generation"],
        ))
    cells = [[str(c) for c in line] for line in lines]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    text = "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells
    )
    deaths = ", ".join(
        "%s %d" % (cause, n) for cause, n in sorted(status.get("worker_deaths", {}).items()) if n
    )
    return text + "\nworker starts %d; deaths: %s\n" % (
        status.get("worker_starts", 0), deaths or "none"
    )


def _supervises_for(status, instance):
    """True when ``status`` is written by a live supervisor whose parent is the process
    of an unverified pid file: twistd's pid file, its pool's supervisor a child of it."""
    from spoon.linux import process_stat

    pid = (status or {}).get("supervisor", {}).get("pid")
    if instance.state != Instance.UNVERIFIED or not isinstance(pid, int):
        return False
    try:
        return int(process_stat(pid)[1]) == instance.pid
    except (OSError, IndexError, ValueError):
        return False


def report_status(pidfile, out=None, err=None, as_json=False):
    """Print the state of the daemon of ``pidfile``; the exit status of ``spoon status``.

    For a pool, a table of the supervisor and each worker (pid, age, state, open
    connections, requests, errors, RSS, heartbeat age, configuration generation) from the
    status file the supervisor rewrites every second beside the pid file; ``as_json``
    prints that status (plus ``health`` and ``reason``) as one JSON object instead.

    0 (healthy): running, every wanted worker serving; 1 (degraded): fewer workers serving
    than wanted, a late heartbeat, a supervisor that stopped updating its status, or it
    cannot be told (an unreadable pid file, a live process not proven to be the daemon:
    the reason on ``err``); 2 (down): not running (no pid file, or a stale one), or no
    worker serving.
    """
    import json

    from spoon.metrics import read_status, status_path_for

    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err

    def emit(code, reason, status=None, text=None):
        if as_json:
            report = dict(status or {}, health=("healthy", "degraded", "down")[code], reason=reason)
            out.write(json.dumps(report, sort_keys=True) + "\n")
        elif text is not None:
            out.write(text)
        return code

    try:
        instance = inspect_pidfile(pidfile)
    except PidFileError as e:
        err.write("%s\n" % e)
        return emit(DEGRADED, str(e))
    if instance.state in (Instance.ABSENT, Instance.STALE):
        return emit(DOWN, instance.reason, text="not running: %s\n" % instance.reason)
    status = read_status(status_path_for(instance.path))
    if not instance.running and not _supervises_for(status, instance):
        err.write("%s\n" % instance.reason)
        return emit(DEGRADED, instance.reason)
    age = process_age(instance.pid)
    klass = (instance.record or {}).get("klass")
    line = "running: pid %d, up %s%s\n" % (
        instance.pid, _duration(age or 0), ", %s" % klass if klass else ""
    )
    if status is None or "supervisor" not in status:
        # One process serving (no pool): running is all there is to tell.
        return emit(HEALTHY, "running", {"pid": instance.pid}, line)
    now = time.time()
    code, reason = pool_health(status, now)
    return emit(code, reason, status, line + _status_table(status, now) + "%s\n" % reason)


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
    """The command line: KLASS, then the command, then the options of
    :data:`spoon.config.SETTINGS` the ``spoon`` command offers (the same spellings as
    ``twistd spoon``), plus the two that belong to one command only."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Start, stop, reload, restart or upgrade (new code, no connection "
        "refused) a spoon server as a daemon, or tell whether it runs. Settings come from KLASS, a --config file, SPOON_* variables and "
        "these options; restart reuses the settings the running instance was started with "
        "unless given again.",
    )
    config.add_arguments(parser, "daemon")
    parser.add_argument("command", nargs="?",
                        choices=["start", "stop", "reload", "restart", "status", "upgrade"])
    parser.add_argument(
        "-D", "--no-daemon", action="store_true", help="stay in the foreground"
    )
    parser.add_argument(
        "--stop-timeout", type=float, default=None, metavar="SECONDS",
        help="how long stop and restart wait for the old process "
        "(default: the graceful timeout + 10)",
    )
    return parser


def _recorded_config(pid_file):
    """``(toml_text, label)``: the settings recorded by the ``start`` of ``pid_file``'s
    instance (running, or stale after a crash), or None."""
    try:
        instance = inspect_pidfile(pid_file)
    except PidFileError:
        return None  # said by the stop that follows
    if instance.state not in (Instance.RUNNING, Instance.STALE) or not instance.record:
        return None
    text = instance.record.get("config")
    if not isinstance(text, str) or not text:
        return None
    return text, "recorded by the running instance (%s)" % record_path(pid_file)


def _user(cfg):
    """(uid, gid, name) to switch to after binding, or None when none was asked for."""
    if cfg.uid is None and cfg.gid is None:
        return None
    from spoon.pool.cli import user_ids

    try:
        # The pool's resolution, so that --uid/--gid mean the same in every entry point.
        uid, gid, name = user_ids(cfg.uid, cfg.gid)
    except (KeyError, ValueError) as e:
        given = " ".join(
            "--%s %s" % (name, getattr(cfg, name))
            for name in ("uid", "gid") if getattr(cfg, name) is not None
        )
        raise UsageError("%s: no such user or group (%s)" % (given, e)) from e
    changes = (uid is not None and uid != os.getuid()) or (gid is not None and gid != os.getgid())
    if changes and os.geteuid() != 0:
        raise UsageError("--uid/--gid: only root can switch to another user or group")
    return uid, gid, name


#: Imported before switching user beyond :data:`spoon.pool.cli.PRELOAD_BEFORE_SWITCH`, which
#: lacks it today: what a Gulp server imports when it starts listening.
PRELOAD_BEFORE_SWITCH = ("spoon.transport",)


def _become(user, server, pooled):
    """Switch to ``user`` (see :func:`_user`) once everything the serving process needs
    is imported: after the switch the interpreter's files may be out of reach.

    A process that serves alone installs its reactor now (``serve_forever`` would, a
    moment later).  A pool's supervisor must not: it forks workers, which install theirs.
    """
    from spoon.pool import cli, worker

    worker.preload(cli.PRELOAD_BEFORE_SWITCH + PRELOAD_BEFORE_SWITCH)
    if not pooled:
        import twisted.internet.reactor  # noqa: F401
    cli.switch_user(*user)
    server.log.info("Running as uid %d gid %d", os.getuid(), os.getgid())


def _build(klass, description):
    """The server of ``klass`` on the endpoint ``description``: a TCP or UDP address is
    bound by the class itself (its ``server_bind``/``server_activate``, as in 1.0.x); a
    UNIX socket is bound, and a systemd socket adopted, here and the server built around
    it."""
    spec = parse_socket_endpoint(description)
    if spec.kind in ("tcp", "udp"):
        server = klass((spec.host, spec.port))
        server.tls = spec.tls  # ssl:...: every process wraps its factory (spoon.tls)
        return server
    sock = bind_socket(spec, **socket_options(klass))
    try:
        return targets.pool_target(sock, klass)
    except BaseException:
        sock.close()
        raise


def _stream_level(cfg, daemonize):
    """The terminal sees the configured level when it was asked for, or when nothing else
    will show the records (a foreground process without a log file); else warnings."""
    level = logs.level_number(cfg.log_level)
    if cfg.source("log_level") != "default" or (not daemonize and not cfg.log_file):
        return level
    return max(level, logging.WARNING)


def _start(cfg, daemonize):
    # Everything that can fail is tried before anything forks.
    if cfg.sentry_dsn and not logs.sentry_available():
        raise UsageError(str(logs.SentryMissing()))
    if daemonize and not cfg.pid_file:
        raise UsageError(
            "starting a daemon needs a pid file: give -p/--pid-file (or set pid_file in "
            "command_line_defaults), or stay in the foreground with -D"
        )
    user = _user(cfg)
    handlers = logs.configure(cfg, stream=sys.stderr, stream_level=_stream_level(cfg, daemonize),
                              sentry=False)
    terminal = handlers[-1]
    if cfg.pid_file and not _upgrading_from(cfg.pid_file):
        check_pidfile(cfg.pid_file)
    nice = cfg.nice
    if nice is None and daemonize:
        # A daemon is reniced by default, as in 1.0.x; a foreground process (systemd,
        # Docker) is left at the priority its manager gave it unless -n says otherwise.
        nice = DEFAULT_NICE
    if nice and not upgrade.is_successor():  # a new generation inherits the old one's
        os.nice(nice)
    klass = cfg.server_class
    workers = cfg.workers
    if targets.is_spork(klass):
        klass.prefork = workers
    server = _build(klass, cfg.endpoint[0])
    server.graceful_timeout = cfg.graceful_timeout
    config.apply_server_attributes(cfg, server)
    if targets.is_spork(klass):
        server.prefork = workers

    def serve():
        if workers > 1:
            # A Spork, or a Spoon pre-forked on request (as ``twistd spoon --spork N``):
            # the same supervisor around this server's socket.
            from spoon.pool.supervisor import Supervisor

            Supervisor(server, workers=workers, graceful_timeout=cfg.graceful_timeout,
                       worker_timeout=cfg.worker_timeout, reactor_name=cfg.reactor,
                       metrics_endpoint=cfg.metrics, statsd=cfg.statsd).run()
        else:
            if cfg.reactor:
                from twisted.application.reactors import installReactor

                installReactor(cfg.reactor)
            server.serve_forever()

    def after_detach():
        if daemonize:
            # stderr is /dev/null now: the terminal's handler has nothing left to do.
            logs.remove_handler(terminal)
        if cfg.sentry_dsn:
            logs.setup_sentry(cfg.sentry_dsn)
        server.log.info(
            "Starting %s on %s (pid %d%s)",
            cfg.server,
            format_address(server.server_address),
            os.getpid(),
            ", %s workers" % workers if workers > 1 else "",
        )
        if user is not None:
            _become(user, server, pooled=workers > 1)

    record = {"klass": cfg.server, "config": cfg.recorded()}
    try:
        _serve(server, cfg.pid_file, daemonize, after_detach, serve, record)
    finally:
        server.server_close()
    return 0


def _upgrading_from(pid_file):
    """True in the new generation of an upgrade whose pid file names the old one."""
    origin = upgrade.origin()
    if origin is None:
        return False
    try:
        return read_pidfile(pid_file) == origin
    except PidFileError:
        return False


def _upgrade_cli(pid_file, klass, timeout, out):
    """``upgrade``: USR2 to the daemon, then wait until a new generation holds the pid file
    (0) or the old one reports that the new one failed (1)."""
    logger = _cli_logger(out)
    try:
        instance = inspect_pidfile(pid_file)
    except PidFileError as e:
        logger.error("%s", e)
        return 1
    if not instance.running:
        _refuse(instance, logger)
        return 1
    asked_at = time.time()
    pid = _send(instance, signal.SIGUSR2, logger)
    if pid is None:
        return 1
    logger.info("Sent SIGUSR2 to process %d (upgrade)", pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # Looked at before the pid file: the old process exits right after the new one
        # took the file over.
        old_alive = process_alive(pid)
        try:
            now = inspect_pidfile(pid_file)
        except PidFileError:
            now = None
        if now is not None and now.running and now.pid != pid:
            logger.info("Upgraded: process %d serves; process %d stops gracefully", now.pid, pid)
            return 0
        result = upgrade.read_result(pid_file)
        if result and result.get("result") == "failed" and result.get("time", 0) >= asked_at:
            logger.error("Upgrade failed: %s; process %d keeps serving", result.get("reason"), pid)
            return 1
        if not old_alive:
            logger.error("Process %d exited during the upgrade", pid)
            return 1
        time.sleep(0.1)
    logger.error("No new generation took over within %ss; process %d keeps serving (see its log)",
                 timeout, pid)
    return 1


#: The ``nice`` increment of a daemon when none is set (1.0.x's).
DEFAULT_NICE = 10


def _program_name():
    program = os.path.basename(sys.argv[0] or "spoon")
    return "python -m spoon.daemon" if program in ("daemon.py", "__main__.py", "-c") else program


def _settings(args, parser):
    """The configuration of this command line; for ``restart``, the settings the running
    instance recorded fill in what is not given again (in place of a --config file)."""
    cfg = config.from_arguments(args, "daemon")
    if args.command == "restart" and cfg.pid_file and not cfg.config_file:
        recorded = _recorded_config(os.path.abspath(cfg.pid_file))
        if recorded is not None:
            cfg = config.from_arguments(args, "daemon", recorded=recorded)
            cfg.restored = [
                (name, cfg.values[name]) for name in sorted(cfg.kinds)
                if cfg.kinds[name] == "file" and cfg.values.get(name) not in (None, False)
            ]
    # Absolute, as recorded for restart and as the daemon (in "/") needs them.
    for name in ("pid_file", "log_file"):
        if cfg.values.get(name):
            cfg.values[name] = os.path.abspath(cfg.values[name])
    return cfg


def main(argv=None):
    """The ``spoon`` / ``python -m spoon.daemon`` command line; returns the exit status."""
    if not upgrade.is_successor():
        return _main(argv, sys.stderr)
    # The new generation of an upgrade: why it could not start goes to the old one too
    # (an exception that escapes says so itself: spoon.pool.upgrade's excepthook).
    out = upgrade.FailureTee(sys.stderr)
    status = _main(argv, out)
    if status:
        out.announce()
    return status


def _main(argv, out):
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = _program_name()
    parser = _parser(prog)
    args = parser.parse_args(argv)
    cfg = _settings(args, parser)
    status = config.check_and_print(cfg)
    if status is not None:
        return status
    if cfg.errors:
        for error in cfg.errors:
            out.write("%s: error: %s\n" % (prog, error))
        return 2
    if args.command is None:
        parser.print_usage(out)
        out.write("%s: error: give a command: start, stop, reload, restart, upgrade or status\n" % prog)
        return 2
    klass = cfg.server_class
    stop_timeout = args.stop_timeout
    if stop_timeout is None:
        stop_timeout = float(cfg.graceful_timeout or 0) + 10.0
    try:
        if not cfg.pid_file and args.command != "start":
            raise UsageError(
                "%s needs the pid file: give -p/--pid-file (or set pid_file in "
                "command_line_defaults)" % args.command
            )
        if args.command == "status":
            return report_status(
                cfg.pid_file, sys.stdout, out, as_json=getattr(cfg, "status_format", None) == "json"
            )
        if args.command == "reload":
            if send_action("reload", cfg.pid_file, logger=_cli_logger(out), klass=klass) is None:
                return 1
            return 0
        if args.command == "stop":
            return _stop_cli(cfg.pid_file, stop_timeout, klass, out)
        if args.command == "upgrade":
            return _upgrade_cli(cfg.pid_file, klass, upgrade.UPGRADE_TIMEOUT + 10.0, out)
        if args.command == "restart":
            status = _stop_cli(cfg.pid_file, stop_timeout, klass, out, restarting=True)
            if status:
                return status
            shown = getattr(cfg, "restored", None)
            if shown:
                _cli_logger(out).info(
                    "Restarting with the options of the running instance: %s",
                    ", ".join("%s=%s" % item for item in shown),
                )
        return _start(cfg, daemonize=not args.no_daemon)
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


def _stop_cli(pid_file, stop_timeout, klass, out, restarting=False):
    """Stop the daemon and wait for it to exit; the exit status.  For ``restart``, a
    daemon that is not running (no pid file, or a stale one) is no failure."""
    logger = _cli_logger(out)
    instance, pid = _act("stop", pid_file, logger, klass)
    if pid is None:
        if restarting and instance is not None and instance.state in (
            Instance.ABSENT, Instance.STALE
        ):
            return 0
        if instance is not None and instance.running:
            pid = instance.pid  # it exited on its own between the check and the signal
        else:
            return 1
    if not wait_for_exit(pid, stop_timeout, instance.start_time):
        out.write(
            "process %d did not exit within %ss of the stop signal\n"
            % (pid, stop_timeout)
        )
        return 1
    logger.info("Process %d has exited", pid)
    # A daemon that switched user may not have been allowed to remove its pid file.
    remove_pidfile(pid_file, pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
