"""``twistd spoon``: run a spoon server class as a Twisted daemon.

``twistd [-n] [--pidfile F] [--logfile F] [--uid U --gid G] spoon --server myapp.EchoServer``

With pre-forking (``--spork N``, N > 1; the default of a Spork class) twistd's process binds
the port before it drops privileges and runs the pool through
:class:`spoon.service.PreforkService` (a supervisor executed as a child, which forks the
workers).  Without it the server listens in twistd's own reactor
(:class:`spoon.service.ServeService`).  Either way twistd's signals work:
TERM stops gracefully, USR1 reloads the configuration (and still rotates ``--logfile``),
HUP restarts the workers one by one (reloads, without pre-forking).
"""

import logging
import os
import signal
import sys

from twisted.application import service
from twisted.logger import Logger, LogLevel, globalLogPublisher
from twisted.python import usage

from spoon.endpoints import parse_socket_endpoint
from spoon.service import PreforkService, ServeService
from spoon.targets import TargetError, build_server, resolve

__all__ = ["Options", "makeService", "SpoonMultiService", "StdlibToTwistedHandler"]


def _escape(text):
    return str(text).replace("\\", "\\\\").replace(":", "\\:")


class Options(usage.Options):
    synopsis = "--server package.module.ServerClass [options]"
    longdesc = (
        "Run a spoon server class (a TCPSpoon, UDPSpoon, TCPSpork or UDPSpork subclass). "
        "With --spork N > 1 a supervisor pre-forks N workers sharing the listening socket, "
        "which twistd binds before dropping privileges (--uid/--gid); with --spork 1 the "
        "server runs in twistd's own process. Signals to twistd: TERM graceful stop, "
        "USR1 reload configuration in every worker (and rotate --logfile), "
        "HUP rolling restart of the workers."
    )
    optParameters = [
        ["server", None, None, "Dotted path of the spoon server class to run (required), "
         "e.g. spoon.examples.EchoServer."],
        ["port", "P", None, "Port to listen on [default: the class's "
         "command_line_defaults['port']].", int],
        ["interface", "I", None, "Interface (address) to listen on [default: the class's "
         "command_line_defaults['interface']]; an IPv6 address serves IPv4 too unless the "
         "class sets ipv6_only."],
        ["spork", "s", None, "Pre-fork N worker processes [default: the class's prefork "
         "for a Spork, 1 for a Spoon]; 1 serves in twistd's own process.", int],
        ["graceful-timeout", None, None, "Seconds a graceful stop waits for in-flight "
         "requests before closing them [default: the class's graceful_timeout].", float],
        ["worker-timeout", None, None, "Seconds without a heartbeat after which a "
         "pre-forked worker is killed and replaced [default: the class's worker_timeout].",
         float],
    ]

    def __init__(self):
        usage.Options.__init__(self)
        self["endpoint"] = []

    def opt_endpoint(self, description):
        """Twisted server endpoint string to listen on, e.g. tcp:8080:interface=127.0.0.1 (repeatable; overrides --port/--interface). With --spork N > 1 only tcp:, tcp6: and udp: endpoints (a socket twistd binds and hands to the workers); udp: is for UDP servers."""
        self["endpoint"].append(description)

    opt_e = opt_endpoint

    def postOptions(self):
        path = self["server"]
        if not path:
            raise usage.UsageError(
                "--server is required: the dotted path of a spoon server class, "
                "e.g. --server spoon.examples.EchoServer"
            )
        # Like "python -m": modules of the current directory can be named.
        cwd = os.getcwd()
        if cwd not in sys.path:
            sys.path.insert(0, cwd)
        self["python_path"] = [cwd]
        try:
            klass = resolve(path)
        except TargetError as e:
            raise usage.UsageError("--server: %s" % e) from None
        from spoon import server as spoon_server

        spoon_classes = (
            spoon_server.TCPSpoon,
            spoon_server.UDPSpoon,
            spoon_server.TCPSpork,
            spoon_server.UDPSpork,
        )
        if not (isinstance(klass, type) and issubclass(klass, spoon_classes)):
            raise usage.UsageError(
                "--server %r is not a spoon server class (a subclass of TCPSpoon, UDPSpoon, "
                "TCPSpork or UDPSpork): it is %r" % (path, klass)
            )
        self["klass"] = klass
        datagram = issubclass(klass, (spoon_server.UDPSpoon, spoon_server.UDPSpork))
        defaults = dict(getattr(klass, "command_line_defaults", None) or {})
        if self["port"] is None:
            self["port"] = int(defaults.get("port", 5000))
        if self["interface"] is None:
            self["interface"] = defaults.get("interface") or "::0"
        if self["spork"] is None:
            spork = defaults.get("spork")
            if spork is None:
                spork = getattr(klass, "prefork", 1) if issubclass(klass, (spoon_server.TCPSpork, spoon_server.UDPSpork)) else 1
            self["spork"] = int(spork)
        if self["spork"] < 1:
            raise usage.UsageError("--spork must be at least 1")
        if not self["endpoint"]:
            self["endpoint"] = [
                "%s:%d:interface=%s" % ("udp" if datagram else "tcp", self["port"], _escape(self["interface"]))
            ]
        for description in self["endpoint"]:
            try:
                spec = parse_socket_endpoint(description)
            except ValueError as e:
                raise usage.UsageError("--endpoint: %s" % e) from None
            if datagram and (spec is None or not spec.datagram):
                raise usage.UsageError(
                    "--endpoint %r: %s is a UDP server, it needs udp:PORT[:interface=HOST]"
                    % (description, path)
                )
            if not datagram and spec is not None and spec.datagram:
                raise usage.UsageError("--endpoint %r: %s is a TCP server" % (description, path))
            if spec is None and self["spork"] > 1:
                raise usage.UsageError(
                    "--endpoint %r cannot be pre-forked: with --spork %d only tcp:, tcp6: "
                    "and udp: endpoints name a socket twistd can bind and hand to the "
                    "workers (use --spork 1 to serve it in twistd's process)"
                    % (description, self["spork"])
                )


# -- logging --------------------------------------------------------------------------------

_LEVELS = [
    (logging.CRITICAL, LogLevel.critical),
    (logging.ERROR, LogLevel.error),
    (logging.WARNING, LogLevel.warn),
    (logging.INFO, LogLevel.info),
]


class StdlibToTwistedHandler(logging.Handler):
    """Forward stdlib ``logging`` records (the server's ``server_logger``) to Twisted's log,
    so that they land in twistd's log file next to Twisted's own events."""

    def emit(self, record):
        try:
            text = self.format(record)
        except Exception:
            self.handleError(record)
            return
        level = LogLevel.debug
        for threshold, twisted_level in _LEVELS:
            if record.levelno >= threshold:
                level = twisted_level
                break
        Logger(namespace=record.name).emit(
            level, "{text}", text=text, log_system="%s#%s pid=%d" % (record.name, level.name, record.process)
        )


def _add_pid(event):
    """Observer placed before twistd's own: adds this process's pid to the "system" part of
    every Twisted event line (relayed pool lines already carry theirs)."""
    if event.get("spoon_pid_in_text") or "pid=" in str(event.get("log_system", "")):
        return
    system = event.get("log_system")
    if system is None:
        level = event.get("log_level")
        system = "%s#%s" % (event.get("log_namespace", "-"), level.name if level is not None else "-")
    event["log_system"] = "%s pid=%d" % (system, os.getpid())


_logging_set_up = False


def _set_up_logging(klass):
    global _logging_set_up
    if _logging_set_up:
        return
    _logging_set_up = True
    globalLogPublisher.addObserver(_add_pid)
    logger = logging.getLogger(getattr(klass, "server_logger", "spoon-server"))
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    handler = StdlibToTwistedHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)


# -- signals --------------------------------------------------------------------------------


class SpoonMultiService(service.MultiService):
    """The top service of ``twistd spoon``: owns the serving services and relays twistd's
    signals to them (USR1 reload, HUP rolling restart, TTIN/TTOU one worker more/fewer).

    Handlers are installed once the reactor runs (twistd has set up its log file by then)
    and chain to whatever was installed before, so twistd's SIGUSR1 log rotation keeps
    working.  twistd only installs its rotation handler when SIGUSR1 has none, so a handler
    some module installed earlier is set aside at construction (letting twistd install its
    own) and chained too.
    """

    RELAYED = (signal.SIGUSR1, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)

    def __init__(self, reactor=None):
        service.MultiService.__init__(self)
        self._reactor = reactor
        self._set_aside = {}
        self._previous = {}
        self.log = Logger(namespace="spoon")
        for signum in self.RELAYED:
            current = signal.getsignal(signum)
            if callable(current):
                self._set_aside[signum] = current
                signal.signal(signum, signal.SIG_DFL)

    @property
    def reactor(self):
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    def startService(self):
        service.MultiService.startService(self)
        self.reactor.callWhenRunning(self._install_signal_handlers)

    def stopService(self):
        self._restore_signal_handlers()
        return service.MultiService.stopService(self)

    def _install_signal_handlers(self):
        if not self.running:
            return
        actions = {
            signal.SIGUSR1: self.reload,
            signal.SIGHUP: self.restart_workers,
            signal.SIGTTIN: self.add_worker,
            signal.SIGTTOU: self.remove_worker,
        }
        for signum, action in actions.items():
            previous = signal.getsignal(signum)
            self._previous[signum] = previous
            chained = [h for h in (previous, self._set_aside.get(signum)) if callable(h)]
            signal.signal(signum, self._make_handler(action, chained))

    def _make_handler(self, action, chained):
        reactor = self.reactor

        def handler(signum, frame):
            reactor.callFromThread(action)
            for other in chained:
                other(signum, frame)

        return handler

    def _restore_signal_handlers(self):
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def reload(self):
        """SIGUSR1: load_config() in every worker (or in the single server)."""
        self.log.info("SIGUSR1: reloading the configuration")
        for child in self:
            try:
                child.reload()
            except Exception:
                self.log.failure("reload failed in {child}", child=child)

    def restart_workers(self):
        """SIGHUP: rolling restart of the pre-forked workers (a reload without them)."""
        self.log.info("SIGHUP: restarting the workers")
        for child in self:
            try:
                if isinstance(child, PreforkService):
                    child.restart_workers()
                else:
                    child.reload()
            except Exception:
                self.log.failure("restart failed in {child}", child=child)

    def add_worker(self):
        """SIGTTIN: one pre-forked worker more."""
        self._each_pool("add_worker", "SIGTTIN: one worker more")

    def remove_worker(self):
        """SIGTTOU: one pre-forked worker fewer (never fewer than one)."""
        self._each_pool("remove_worker", "SIGTTOU: one worker fewer")

    def _each_pool(self, method, what):
        pools = [child for child in self if isinstance(child, PreforkService)]
        if not pools:
            self.log.info("{what}: ignored, no pre-forked pool (--spork 1)", what=what.split(":")[0])
            return
        self.log.info("{what}", what=what)
        for pool in pools:
            getattr(pool, method)()


def makeService(options):
    """Build the ``twistd spoon`` service tree from parsed :class:`Options`."""
    klass = options["klass"]
    _set_up_logging(klass)
    top = SpoonMultiService()
    graceful = options["graceful-timeout"]
    # twistd drops privileges (--uid/--gid) between privilegedStartService and
    # startService; the pool switches user in its supervisor (see PreforkService).
    parent = getattr(options, "parent", None) or {}
    uid, gid = parent.get("uid"), parent.get("gid")
    if options["spork"] > 1:
        for description in options["endpoint"]:
            PreforkService(
                options["server"],
                description,
                workers=options["spork"],
                graceful_timeout=graceful,
                worker_timeout=options["worker-timeout"],
                python_path=options.get("python_path", ()),
                uid=uid,
                gid=gid,
                # twistd --reactor NAME: the workers run the same kind of reactor.
                reactor_name=parent.get("reactor") or None,
            ).setServiceParent(top)
    else:
        server = build_server(klass, (options["interface"], options["port"]))
        ServeService(server, options["endpoint"], graceful_timeout=graceful).setServiceParent(top)
    return top
