"""Twisted services that run a spoon server inside a program that already has a reactor.

Two ways, one per process model (DESIGN.md §2):

- :class:`ServeService` serves a spoon server in *this* reactor (no pre-forking): it
  listens with ``server.protocol_factory(reactor)`` and stops gracefully, letting in-flight
  handlers finish.
- :class:`PreforkService` runs a pre-forked pool.  A process with a running reactor must
  not fork workers that keep using that reactor (epoll and waker descriptors would be
  shared), so the service binds the listening socket itself (in
  ``privilegedStartService``, before ``twistd --uid`` drops privileges) and *executes*
  ``python -m spoon.prefork`` with ``reactor.spawnProcess``, handing the socket down as an
  inherited descriptor.  The supervisor forks the workers; their output comes back here one
  log event per line.

Both are plain ``IService`` providers: add them to an application (``twistd spoon`` does,
see :mod:`spoon.tap`) or call ``startService``/``stopService`` yourself.
"""

import atexit
import logging
import os
import signal
import socket
import sys

from twisted.application import service
from twisted.internet import defer
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

from spoon.net import (
    SocketSpec,
    bind_socket,
    format_address,
    parse_socket_endpoint,
    socket_options,
)
from spoon import logs, tls
from spoon.pool import upgrade
from spoon.lifecycle import GracefulStop
from spoon.linux import process_ids, process_stat
from spoon.reactors import given_or_global
from spoon.targets import (
    TargetError,
    check_endpoint_kind,
    is_datagram_server_class,
    is_server_class,
    resolve,
)

__all__ = ["PreforkService", "ServeService"]

#: Descriptor number under which the supervisor receives the listening socket.
CHILD_SOCKET_FD = 3
#: Descriptor on which the new supervisor of an upgrade says that it serves.
UPGRADE_READY_FD = 4


def _import_root(path):
    """The ``sys.path`` entry from which the module of ``path`` was imported (None if it
    cannot be told): the supervisor, a fresh interpreter, needs it to import the target."""
    module_name = path.rpartition(".")[0]
    module = sys.modules.get(module_name)
    filename = getattr(module, "__file__", None)
    if not filename:
        return None
    root = os.path.dirname(os.path.abspath(filename))
    depth = module_name.count(".") + (1 if os.path.basename(filename) == "__init__.py" else 0)
    for _ in range(depth):
        root = os.path.dirname(root)
    return root


def reactor_short_name(reactor):
    """The twistd short name (``epoll``, ``poll``, ``select``...) of ``reactor``'s kind, found
    by its class's module among ``twisted.application.reactors.getReactorTypes()``; None
    for a reactor no name installs (a test's fake reactor, say)."""
    from twisted.application.reactors import getReactorTypes

    module = type(reactor).__module__
    for entry in getReactorTypes():
        if entry.moduleName == module and entry.shortName != "default":
            return entry.shortName
    return None


# -- log relay ------------------------------------------------------------------------------


class _LineRelay:
    """Turn a byte stream into one log event per line (a partial line waits for its end)."""

    MAX_LINE = 64 * 1024

    def __init__(self, emit):
        self._emit = emit
        self._buffer = b""

    def feed(self, data):
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > self.MAX_LINE:
            lines.append(self._buffer)
            self._buffer = b""
        for line in lines:
            self._send(line)

    def flush(self):
        if self._buffer:
            line, self._buffer = self._buffer, b""
            self._send(line)

    def _send(self, line):
        text = line.rstrip(b"\r").decode("utf-8", "replace")
        if text.strip():
            self._emit(text)


class _SupervisorProtocol(ProcessProtocol):
    """The service's side of one supervisor process: relays its output, reports its end.

    The supervisor and its workers write one JSON object a line (``--log-format json``):
    each becomes an event of that logger and level, with the writer's pid and time (see
    :func:`spoon.logs.relayed_event`); any other line (a stray print) is relayed as it is,
    under "spoon.pool".
    """

    def __init__(self, service, log):
        self.service = service
        self.started_at = service.reactor.seconds()
        self.relays = {fd: _LineRelay(self._line) for fd in (1, 2)}
        self.log = log
        self.pid = None
        #: The new supervisor of an upgrade says on this descriptor when it serves.
        self.ready = False
        self._upgrade_lines = _LineRelay(self._upgrade_line)

    def _line(self, text):
        fields = logs.parse_line(text)
        if fields is None:
            self.log.info("{line}", line=text, log_system="spoon.pool")
            return
        Logger(namespace=fields["logger"]).emit(
            logs.twisted_level(fields["level"]), **logs.relayed_event(fields)
        )

    def childDataReceived(self, childFD, data):
        if childFD == UPGRADE_READY_FD:
            self._upgrade_lines.feed(data)
            return
        relay = self.relays.get(childFD)
        if relay is not None:
            relay.feed(data)

    def _upgrade_line(self, text):
        if text.startswith("READY ") and not self.ready:
            self.ready = True
            self.service._successor_ready(self)

    def processEnded(self, reason):
        for relay in self.relays.values():
            relay.flush()
        self.service._supervisor_ended(self, reason)


#: Exit status of ``python -m spoon.prefork`` when the pool cannot serve (its workers
#: cannot start, or this process cannot fork workers): restarting it would not help.
POOL_CANNOT_SERVE = 3


def _signal_process(process, signum):
    """Signal a spawned process; False when it has exited (or went away meanwhile)."""
    try:
        process.signalProcess(int(signum))
    except Exception:  # ProcessExitedAlready
        return False
    return True


def _exit_now(code):
    """At interpreter exit, once twistd has cleaned up: leave with ``code``."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


def _descendants(pid):
    """Every live process below ``pid`` (read from /proc), for the last-resort kill."""
    parents = {}
    for child in process_ids():
        try:
            ppid = int(process_stat(child)[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


class PreforkService(service.Service):
    """Run a pre-forked pool of ``target`` (dotted path of a spoon server class, or of a
    callable returning a Twisted ``IProtocolFactory``) on one listening socket.

    ``endpoint``: a "tcp:PORT[:interface=HOST][:backlog=N]", "tcp6:..." or "udp:..."
    string, a ``(host, port)`` tuple (TCP, or UDP for a datagram server class), or an
    already bound socket object.  ``workers``: pool size (default: the class's ``prefork``).
    ``graceful_timeout`` / ``worker_timeout``: passed to the supervisor (default: its own).
    ``reactor``: the reactor to spawn from (default: the global one).  ``uid`` / ``gid``:
    the user the pool runs as; then the supervisor is started in
    ``privilegedStartService`` (while this process is still privileged) and switches user
    itself before it forks any worker (``twistd --uid/--gid`` passes them).
    ``reactor_name``: the reactor the workers install, by twistd short name (default: the
    kind of reactor this process runs, so ``twistd --reactor poll`` gives poll workers).
    ``log_level``: the lowest level the pool logs ("debug", "info"...; default info); its
    records come back into this process's Twisted log with their writer's pid and time.
    ``status_file``: where the supervisor publishes its status (see ``spoon.metrics``);
    ``extra_args``: more options of ``python -m spoon.prefork`` (``--metrics``...).

    After ``privilegedStartService`` (or ``startService``) ``address`` is the bound address,
    so port 0 works.  ``stopService`` stops the pool gracefully (SIGTERM) and fires when the
    supervisor has exited; since every worker inherits the supervisor's output pipes, that is
    also when every worker is gone.  If the supervisor dies on its own it is started again,
    after a delay that doubles on every quick death (``restart_delay`` bounds it).
    """

    name = None
    #: Seconds beyond ``graceful_timeout`` to wait before killing what is left of the pool.
    stop_margin = 10.0
    #: A supervisor that ran at least this long resets the back-off.
    stable_after = 30.0

    def __init__(
        self,
        target,
        endpoint=("127.0.0.1", 0),
        workers=None,
        graceful_timeout=None,
        worker_timeout=None,
        reactor=None,
        restart_delay=(0.5, 30.0),
        python=None,
        python_path=(),
        extra_args=(),
        uid=None,
        gid=None,
        reactor_name=None,
        log_level="info",
        status_file=None,
    ):
        self.target = target
        self.log_level = log_level
        #: Where the supervisor publishes its status table (``spoon X status -p PIDFILE``
        #: reads PIDFILE.status): twistd passes its own pid file's.
        self.status_file = status_file
        self.target_object = resolve(target)
        if isinstance(self.target_object, type) and not is_server_class(self.target_object):
            raise TargetError("%r is a class but not a spoon server class" % target)
        if not callable(self.target_object):
            raise TargetError("%r is neither a spoon server class nor a callable" % target)
        if getattr(self.target_object, "__module__", None) == "__main__" or target.startswith("__main__."):
            raise TargetError(
                "%r is defined in __main__, which the supervisor (a new interpreter) cannot "
                "import: move it to a module" % target
            )
        self._endpoint = endpoint
        self.spec = self._spec_for(endpoint)
        self.workers = workers
        self.graceful_timeout = graceful_timeout
        self.worker_timeout = worker_timeout
        self._reactor = reactor
        self.restart_delay = restart_delay
        self.python = python or sys.executable
        roots = [p for p in python_path if p]
        root = _import_root(target)
        if root is not None and root not in roots:
            roots.append(root)
        self.python_path = roots
        self.extra_args = list(extra_args)
        self.uid = uid
        self.gid = gid
        self._reactor_name = reactor_name
        self.log = Logger(namespace="spoon.pool")
        self.socket = endpoint if isinstance(endpoint, socket.socket) else None
        self.address = self.socket.getsockname() if self.socket is not None else None
        self.process = None
        self._protocol = None
        self._stopping = False
        self._stopped_deferreds = []
        self._restart_call = None
        self._kill_call = None
        self._quick_deaths = 0
        self._spawn_pending = False
        #: The new supervisor of an upgrade under way, and the call that gives up on it.
        self._successor = None
        self._successor_timeout = None
        self.upgrade_timeout = upgrade.UPGRADE_TIMEOUT

    # -- configuration ------------------------------------------------------------------

    def _spec_for(self, endpoint):
        datagram_class = is_datagram_server_class(self.target_object)
        if isinstance(endpoint, socket.socket):
            datagram = endpoint.type == socket.SOCK_DGRAM
            spec = SocketSpec("udp" if datagram else "tcp", None, None)
        elif isinstance(endpoint, str):
            spec = parse_socket_endpoint(endpoint)
            if spec is None:
                raise ValueError(
                    "endpoint %r cannot be pre-forked: only tcp:, tcp6:, udp:, unix:, ssl: and "
                    "systemd: endpoints name a socket that can be bound here and handed to "
                    "the workers" % endpoint
                )
        else:
            host, port = endpoint[0], int(endpoint[1])
            spec = SocketSpec("udp" if datagram_class else "tcp", host, port)
        check_endpoint_kind(self.target_object, spec.datagram, endpoint)
        return spec

    @property
    def reactor(self):
        self._reactor = given_or_global(self._reactor)
        return self._reactor

    @property
    def reactor_name(self):
        """Short name of the reactor the workers install (None: Twisted's default)."""
        if self._reactor_name is None:
            return reactor_short_name(self.reactor)
        return self._reactor_name

    @property
    def pid(self):
        """The supervisor's pid while it runs, else None."""
        return self.process.pid if self.process is not None else None

    def _bind(self):
        if self.socket is None:
            self.socket = bind_socket(self.spec, **socket_options(self.target_object))
            self.address = self.socket.getsockname()

    def supervisor_args(self):
        """The supervisor's command line (``python -m spoon.prefork ...``)."""
        args = [self.python, "-m", "spoon.prefork", "--fd", str(CHILD_SOCKET_FD), "--target", self.target,
                # One JSON object a line: parsed back into events of this process's log.
                "--log-format", "json", "--log-level", str(self.log_level)]
        if self._drops_privileges():
            # Executed while this process is still privileged (an interpreter installed
            # where only root can read could not be executed as "nobody"); the supervisor
            # imports what the pool needs, then switches user before forking a worker.
            if self.uid is not None:
                args += ["--uid", str(self.uid)]
            if self.gid is not None:
                args += ["--gid", str(self.gid)]
        if self.workers is not None:
            args += ["--workers", str(int(self.workers))]
        if self.graceful_timeout is not None:
            args += ["--graceful-timeout", str(self.graceful_timeout)]
        if self.worker_timeout is not None:
            args += ["--worker-timeout", str(self.worker_timeout)]
        if self.spec.datagram:
            args.append("--udp")
        if self.spec.proxy:
            args.append("--proxy-protocol")
        if self.spec.tls:
            args += tls.to_arguments(self.spec.tls)
        reactor_name = self.reactor_name
        if reactor_name:
            args += ["--reactor", reactor_name]
        return args + self.extra_args

    def _drops_privileges(self):
        if self.uid is None and self.gid is None:
            return False
        return (self.uid is not None and self.uid != os.getuid()) or (
            self.gid is not None and self.gid != os.getgid()
        )

    def _environment(self):
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        if self.status_file:
            env["SPOON_STATUS_FILE"] = self.status_file
        paths = self.python_path + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if paths:
            env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        return env

    # -- IService -----------------------------------------------------------------------

    def privilegedStartService(self):
        """Bind now: twistd calls this before it drops privileges (port 783 as root).

        With ``uid``/``gid`` the supervisor is started now too, while this process may
        still execute and read everything; it switches user itself.
        """
        self._bind()
        service.Service.privilegedStartService(self)
        if self._drops_privileges():
            self._stopping = False
            self._spawn_pending = True
            self._spawn()

    def startService(self):
        self._bind()
        service.Service.startService(self)
        self._stopping = False
        self._quick_deaths = 0
        self._spawn_pending = self.process is None
        # Spawning needs a running reactor (child reaping); twistd calls startService just
        # before reactor.run().
        self.reactor.callWhenRunning(self._spawn)

    def stopService(self):
        """Stop the pool gracefully; the Deferred fires once every process is gone."""
        service.Service.stopService(self)
        self._stopping = True
        if self._successor is not None:
            # Stopped while an upgrade was starting: its new supervisor goes too.
            process = self._successor[0]
            self._end_upgrade()
            _signal_process(process, signal.SIGTERM)
        self._spawn_pending = False
        if self._restart_call is not None and self._restart_call.active():
            self._restart_call.cancel()
        self._restart_call = None
        self._close_socket()
        if self.process is None:
            return defer.succeed(None)
        d = defer.Deferred()
        self._stopped_deferreds.append(d)
        self._signal(signal.SIGTERM)
        grace = self.graceful_timeout
        if grace is None:
            grace = getattr(self.target_object, "graceful_timeout", 30)
        if self._kill_call is None:
            self._kill_call = self.reactor.callLater(float(grace) + self.stop_margin, self._kill_all)
        return d

    def _close_socket(self):
        # The supervisor and workers hold their own copies of the descriptor.
        if self.socket is not None and not isinstance(self._endpoint, socket.socket):
            self.socket.close()
            self.socket = None

    # -- the supervisor process ---------------------------------------------------------

    def _spawn(self):
        if not self._spawn_pending or self._stopping or self.process is not None:
            return
        self._spawn_pending = False
        self._restart_call = None
        try:
            self.process, self._protocol = self._start_supervisor()
        except Exception as e:
            self.log.error("cannot start the supervisor ({python}): {error}", python=self.python, error=e)
            self._schedule_restart(None, "could not be started", 0.0)
            return
        self.log.info(
            "started supervisor pid {pid} for {target} on {kind} {address}",
            pid=self.process.pid,
            target=self.target,
            kind=self.spec.kind,
            address=format_address(self.address),
        )

    def _start_supervisor(self, upgrading=False):
        """Spawn ``python -m spoon.prefork`` on the socket; ``(process, protocol)``.  The
        new supervisor of an upgrade also gets a pipe on which it says when it serves."""
        protocol = _SupervisorProtocol(self, self.log)
        child_fds = {1: "r", 2: "r", CHILD_SOCKET_FD: self.socket.fileno()}
        env = self._environment()
        if upgrading:
            child_fds[UPGRADE_READY_FD] = "r"
            env[upgrade.ENV_READY_FD] = str(UPGRADE_READY_FD)
        null = os.open(os.devnull, os.O_RDONLY)
        child_fds[0] = null
        try:
            process = self.reactor.spawnProcess(
                protocol, self.python, self.supervisor_args(), env=env, childFDs=child_fds
            )
        finally:
            os.close(null)
        protocol.pid = process.pid
        return process, protocol

    # -- zero-downtime code upgrade -----------------------------------------------------

    def upgrade(self):
        """Start a new supervisor (a new interpreter: it imports the code as it is on disk
        now) on the same socket; once all its workers serve, the old supervisor stops
        gracefully without refusing connections (USR2); if the new one exits first or does
        not serve within ``upgrade_timeout`` seconds, it is stopped and the old one keeps
        serving.  Returns False when no upgrade was started."""
        if self.process is None or self._stopping or self.socket is None:
            self.log.warn("upgrade ignored: no pool is running")
            return False
        if self._successor is not None:
            self.log.info("upgrade ignored: new supervisor pid {pid} is starting", pid=self._successor[1].pid)
            return False
        try:
            process, protocol = self._start_supervisor(upgrading=True)
        except Exception as e:
            self.log.error("upgrade failed: cannot start a new supervisor: {error}", error=e)
            return False
        self._successor = (process, protocol)
        self._successor_timeout = self.reactor.callLater(self.upgrade_timeout, self._successor_too_late)
        self.log.info(
            "upgrading: new supervisor pid {pid} starting beside pid {old}",
            pid=process.pid, old=self.process.pid,
        )
        return True

    def _successor_ready(self, protocol):
        if self._successor is None or self._successor[1] is not protocol:
            return
        process, _ = self._successor
        self._end_upgrade()
        old, self.process, self._protocol = self.process, process, protocol
        self._quick_deaths = 0
        self.log.info(
            "upgrade: new supervisor pid {pid} serves; stopping pid {old} gracefully",
            pid=process.pid, old=old.pid if old is not None else None,
        )
        if old is not None:
            _signal_process(old, signal.SIGUSR2)

    def _successor_too_late(self):
        self._successor_timeout = None
        if self._successor is None:
            return
        process, protocol = self._successor
        self.log.error(
            "upgrade failed: new supervisor pid {pid} did not serve within {timeout}s; "
            "stopping it, pid {old} keeps serving",
            pid=protocol.pid, timeout=self.upgrade_timeout, old=self.pid,
        )
        self._end_upgrade()
        _signal_process(process, signal.SIGTERM)

    def _successor_ended(self, protocol, how):
        if self._successor is None or self._successor[1] is not protocol:
            return
        self._end_upgrade()
        self.log.error(
            "upgrade failed: new supervisor pid {pid} {how} before serving; pid {old} keeps "
            "serving",
            pid=protocol.pid, how=how, old=self.pid,
        )

    def _end_upgrade(self):
        self._successor = None
        if self._successor_timeout is not None and self._successor_timeout.active():
            self._successor_timeout.cancel()
        self._successor_timeout = None

    def _supervisor_ended(self, protocol, reason):
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        how = "killed by signal %s" % sig if sig else "exited with status %s" % code
        if protocol is not self._protocol:
            # An upgrade's new supervisor that never served, or the old one stopping.
            self._successor_ended(protocol, how)
            return
        pid = protocol.pid
        self.process = None
        self._protocol = None
        if code == POOL_CANNOT_SERVE and not self._stopping:
            self._give_up(pid)
            return
        if self._stopping:
            if self._kill_call is not None and self._kill_call.active():
                self._kill_call.cancel()
            self._kill_call = None
            self.log.info("supervisor pid {pid} {how}: pool stopped", pid=pid, how=how)
            deferreds, self._stopped_deferreds = self._stopped_deferreds, []
            for d in deferreds:
                d.callback(None)
            return
        self._schedule_restart(pid, how, self.reactor.seconds() - protocol.started_at)

    def _give_up(self, pid):
        """The pool cannot serve (its workers cannot start, say): a new supervisor would
        fail the same way while the port stays open and unanswered.  Close it, stop the
        reactor, and have the process exit non-zero."""
        self.log.error(
            "supervisor pid {pid}: the pool cannot serve (see the error above); stopping, "
            "exit status {code}",
            pid=pid,
            code=POOL_CANNOT_SERVE,
        )
        self._stopping = True
        self._close_socket()
        if getattr(self.reactor, "running", False):
            atexit.register(_exit_now, POOL_CANNOT_SERVE)
            self.reactor.stop()

    def _schedule_restart(self, pid, how, ran):
        if ran >= self.stable_after:
            self._quick_deaths = 0
        low, high = self.restart_delay
        delay = min(high, low * (2 ** self._quick_deaths))
        self._quick_deaths += 1
        self.log.warn(
            "supervisor pid {pid} {how} after {ran:.1f}s; starting a new one in {delay:.1f}s",
            pid=pid,
            how=how,
            ran=ran,
            delay=delay,
        )
        self._spawn_pending = True
        self._restart_call = self.reactor.callLater(delay, self._spawn)

    def _kill_all(self):
        """The graceful stop took too long: kill the supervisor and everything below it."""
        self._kill_call = None
        if self.process is None:
            return
        pid = self.process.pid
        victims = _descendants(pid)
        self.log.warn(
            "pool did not stop in time: killing supervisor {pid} and {n} process(es) below it",
            pid=pid,
            n=len(victims),
        )
        for victim in [pid] + victims:
            try:
                os.kill(victim, signal.SIGKILL)
            except OSError:
                pass

    # -- signals relayed to the supervisor ----------------------------------------------

    def _signal(self, signum):
        return self.process is not None and _signal_process(self.process, signum)

    def reload(self):
        """``load_config()`` in every worker (SIGUSR1 to the supervisor)."""
        return self._signal(signal.SIGUSR1)

    def restart_workers(self):
        """Rolling restart: reload in the supervisor, then fresh workers one by one (HUP)."""
        return self._signal(signal.SIGHUP)

    def add_worker(self):
        """One worker more (TTIN)."""
        return self._signal(signal.SIGTTIN)

    def remove_worker(self):
        """One worker less, never fewer than one (TTOU)."""
        return self._signal(signal.SIGTTOU)

    def stop_now(self):
        """Fast stop (SIGINT): workers close their connections at once."""
        self._stopping = True
        return self._signal(signal.SIGINT)


# -- serving in this reactor ----------------------------------------------------------------


class _StdlibStyle:
    """A Twisted ``Logger`` seen as the stdlib-style logger :class:`GracefulStop` writes
    to (``info``/``warning`` with %-arguments)."""

    def __init__(self, log):
        self.log = log

    def info(self, message, *args):
        self.log.info("{message}", message=message % args)

    def warning(self, message, *args):
        self.log.warn("{message}", message=message % args)


class ServeService(service.Service):
    """Serve a spoon ``server`` in this process's reactor on ``endpoints`` (Twisted endpoint
    strings: "tcp:", "tcp6:" and "udp:" are bound like the server class would bind them;
    any other stream endpoint goes through ``serverFromString``).

    ``stopService`` stops listening, lets in-flight handlers finish for at most
    ``graceful_timeout`` seconds (default: the server's), then closes what is left.
    """

    def __init__(self, server, endpoints, reactor=None, graceful_timeout=None):
        self.server = server
        self.endpoints = list(endpoints)
        self._reactor = reactor
        self.graceful_timeout = graceful_timeout
        self.datagram = is_datagram_server_class(type(server))
        self.log = Logger(namespace="spoon.serve")
        self.ports = []
        self.protocols = []
        self.factory = None
        self._listening = False
        for description in self.endpoints:
            spec = parse_socket_endpoint(description)
            check_endpoint_kind(type(server), spec is not None and spec.datagram, description)

    @property
    def reactor(self):
        self._reactor = given_or_global(self._reactor)
        return self._reactor

    def privilegedStartService(self):
        """Listen now: twistd calls this before it drops privileges."""
        self._listen()
        service.Service.privilegedStartService(self)

    def startService(self):
        self._listen()
        service.Service.startService(self)

    def _listen(self):
        if self._listening:
            return
        self._listening = True
        reactor = self.reactor
        options = socket_options(type(self.server))
        if not self.datagram:
            self.factory = self.server.protocol_factory(reactor)
        try:
            for description in self.endpoints:
                spec = parse_socket_endpoint(description)
                if spec is None:
                    self.ports.append(self._listen_endpoint(description))
                    continue
                sock = bind_socket(spec, **options)
                try:
                    if spec.datagram:
                        protocol = self.server.protocol_factory(reactor)
                        self.protocols.append(protocol)
                        # One byte over max_packet_size shows a datagram was cut.
                        port = reactor.adoptDatagramPort(
                            sock.fileno(),
                            sock.family,
                            protocol,
                            maxPacketSize=self.server.max_packet_size + 1,
                        )
                    elif spec.proxy:
                        # haproxy:tcp:...: a factory of its own, that reads the header.
                        factory = self.server.protocol_factory(reactor, proxy_protocol=True)
                        self.protocols.append(factory)
                        port = self._listen_stream(sock, factory)
                    elif spec.tls:
                        # ssl:...: Twisted's TCP transport under its TLS layer.
                        port = self._listen_stream(sock, tls.wrap_factory(self.factory, spec.tls))
                    else:
                        port = self._listen_stream(sock)
                finally:
                    sock.close()  # the reactor holds its own duplicate
                self.ports.append(port)
                host = port.getHost()
                self.log.info(
                    "{server} listening on {kind} {address}",
                    server=type(self.server).__name__,
                    kind=spec.kind,
                    address=format_address(
                        (host.host, host.port) if hasattr(host, "port") else host.name),
                )
        except BaseException:
            self._stop_listening()
            self._listening = False
            raise

    def _listen_stream(self, sock, factory=None):
        """Gulp servers get spoon's lean transport, as under ``serve_forever()``; any
        other factory a server class returns gets Twisted's own."""
        from spoon import greenio, listener

        factory = factory or self.factory
        if isinstance(factory, greenio.GulpFactory):
            return listener.listen_one_by_one(
                sock,
                factory,
                self.reactor,
                listener.serve_gulp(factory, self.reactor),
                shared=False,
            )
        return self.reactor.adoptStreamPort(sock.fileno(), sock.family, factory)

    def _listen_endpoint(self, description):
        from twisted.internet.endpoints import serverFromString

        endpoint = serverFromString(self.reactor, description)
        result = []
        endpoint.listen(self.factory).addBoth(result.append)
        if not result:
            raise RuntimeError("endpoint %r did not start listening at once" % description)
        if isinstance(result[0], BaseException) or hasattr(result[0], "raiseException"):
            result[0].raiseException()
        self.log.info("{server} listening on {address}", server=type(self.server).__name__, address=result[0].getHost())
        return result[0]

    def _stop_listening(self):
        ports, self.ports = self.ports, []
        for port in ports:
            port.stopListening()

    def stopService(self):
        """Graceful stop (:class:`spoon.lifecycle.GracefulStop`): the Deferred fires when
        no handler is left running."""
        service.Service.stopService(self)
        self._listening = False
        ports, self.ports = self.ports, []
        grace = self.graceful_timeout
        if grace is None:
            grace = getattr(self.server, "graceful_timeout", 30)
        drainables = [t for t in [self.factory] + self.protocols if t is not None]
        stop = GracefulStop(self.reactor, ports, drainables, grace, _StdlibStyle(self.log))
        return stop.start(graceful=True).when_done()

    def reload(self):
        """Run the server's reload handler (``load_config()``) in the reactor thread."""
        handler = getattr(self.server, "reload_handler", None)
        signum = getattr(self.server, "signal_reload", None) or signal.SIGUSR1
        if handler is not None:
            handler(signum, None)
        else:
            self.server.load_config()
