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

import os
import signal

from twisted.application import service
from twisted.logger import ILogObserver, Logger

from spoon import config as spoon_config
from spoon import logs, metrics
from spoon.service import PreforkService, ServeService
from spoon.targets import build_server

__all__ = ["Options", "makeService", "SpoonMultiService"]

#: ``twistd spoon``'s options, generated from :data:`spoon.config.SETTINGS`: ``--server``,
#: ``-P/--port``, ``-I/--interface``, ``-e/--endpoint``, ``-s/--spork``, the timeouts, the
#: log level and format, ``--config``, ``--check-config``, ``--print-config``, ``--version``.
#: twistd's own ``--reactor``, ``--uid``, ``--gid``, ``--pidfile`` and ``--logfile`` are
#: settings too (see :func:`spoon.config.build`'s ``host``).
Options = spoon_config.twisted_options("twistd")
Options.synopsis = "--server package.module.ServerClass [options]"
Options.longdesc = (
    "Run a spoon server class (a TCPSpoon, UDPSpoon, TCPSpork or UDPSpork subclass). "
    "With --spork N > 1 a supervisor pre-forks N workers sharing the listening socket, "
    "which twistd binds before dropping privileges (--uid/--gid); with --spork 1 the "
    "server runs in twistd's own process. Settings also come from a TOML file (--config) "
    "and SPOON_* environment variables. Signals to twistd: TERM graceful stop, "
    "USR1 reload configuration in every worker (and rotate --logfile), "
    "HUP rolling restart of the workers."
)


# -- signals --------------------------------------------------------------------------------


class SpoonMultiService(service.MultiService):
    """The top service of ``twistd spoon``: owns the serving services and relays twistd's
    signals to them (USR1 reload, HUP rolling restart, TTIN/TTOU one worker more/fewer,
    USR2 zero-downtime code upgrade of each pool).

    Handlers are installed once the reactor runs (twistd has set up its log file by then)
    and chain to whatever was installed before, so twistd's SIGUSR1 log rotation keeps
    working.  twistd only installs its rotation handler when SIGUSR1 has none, so a handler
    some module installed earlier is set aside at construction (letting twistd install its
    own) and chained too.
    """

    RELAYED = (signal.SIGUSR1, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR2)

    def __init__(self, reactor=None, log_observer=None, log_file=None):
        service.MultiService.__init__(self)
        self._reactor = reactor
        #: Given to twistd as the application's ``ILogObserver`` (spoon's line format) in
        #: place of its own, whose SIGUSR1 rotation of ``log_file`` this service then does.
        self.log_observer = log_observer
        self.log_file = log_file
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

    def setServiceParent(self, parent):
        """twistd makes the application and adds this service to it, then starts its log
        with the application's ``ILogObserver`` component when there is one: this is the
        moment to set it."""
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            if parent.getComponent(ILogObserver, None) is None:
                parent.setComponent(ILogObserver, self.log_observer)
        return service.MultiService.setServiceParent(self, parent)

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
            signal.SIGUSR2: self.upgrade,
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
        """SIGUSR1: load_config() in every worker (or in the single server), after rotating
        twistd's log file when spoon's observer writes it (as twistd's own would)."""
        if self.log_file is not None:
            self.log_file.rotate()
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

    def upgrade(self):
        """SIGUSR2: a new supervisor from the code on disk for each pre-forked pool; the
        old one stops once the new one serves (see PreforkService.upgrade)."""
        self._each_pool("upgrade", "SIGUSR2: upgrading the code")

    def _each_pool(self, method, what):
        pools = [child for child in self if isinstance(child, PreforkService)]
        if not pools:
            self.log.info("{what}: ignored, no pre-forked pool (--spork 1)", what=what.split(":")[0])
            return
        self.log.info("{what}", what=what)
        for pool in pools:
            getattr(pool, method)()


def makeService(options):
    """Build the ``twistd spoon`` service tree from parsed :class:`Options` (its
    ``options.config``)."""
    config = options.config
    parent = getattr(options, "parent", None)
    level = logs.level_number(config.log_level)
    observer = log_file = None
    if parent is not None and not parent.get("logger"):
        observer, log_file = logs.twistd_observer(parent, config.log_format, level)
    logs.forward_stdlib_to_twisted(level)
    top = SpoonMultiService(log_observer=observer, log_file=log_file)
    if config.workers > 1:
        # twistd drops privileges (--uid/--gid) between privilegedStartService and
        # startService; the pool switches user in its supervisor (see PreforkService).
        for number, description in enumerate(config.endpoint):
            # One pool publishes (one metrics port, one status file): the first one.
            # Each pool's supervisor (a new interpreter) is told the server attributes set
            # beyond the class (worker limits, proxy_allow_from).
            publish = spoon_config.server_attribute_arguments(config)
            if number == 0:
                for flag, value in (("--metrics", config.metrics), ("--statsd", config.statsd)):
                    if value:
                        publish += [flag, value]
            PreforkService(
                config.server,
                description,
                workers=config.workers,
                graceful_timeout=config.graceful_timeout,
                worker_timeout=config.worker_timeout,
                python_path=[os.getcwd()],
                uid=config.uid,
                gid=config.gid,
                # twistd --reactor NAME: the workers run the same kind of reactor.
                reactor_name=config.reactor,
                # The pool's records come back as JSON lines, re-emitted here in twistd's
                # log (spoon's format) with their writer's pid.
                log_level=config.log_level,
                extra_args=publish,
                status_file=metrics.status_path_for(config.pid_file)
                if number == 0 and config.pid_file
                else None,
            ).setServiceParent(top)
    else:
        server = build_server(config.server_class, (config.interface, config.port))
        spoon_config.apply_server_attributes(config, server)
        ServeService(server, config.endpoint, graceful_timeout=config.graceful_timeout).setServiceParent(top)
    return top
