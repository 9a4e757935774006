"""``python -m spoon.pool --fd FD --target DOTTED.PATH`` (also ``python -m spoon.prefork``):
a supervisor around an inherited listening socket.  That is how a process with a running
reactor (twistd, the embedding service) gets a pool without forking its own reactor: it
binds, then executes this with the socket as an inherited descriptor.
"""

import argparse
import logging
import os
import signal
import socket

from spoon import config, linux, logs, tls
from spoon.pool import worker
from spoon.pool.reactor import CannotFork, check_reactor_choice
from spoon.pool.supervisor import Supervisor
from spoon.targets import pool_target

__all__ = ["main", "switch_user", "user_ids", "PRELOAD_BEFORE_SWITCH"]


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m spoon.prefork",
        description="Supervise a pre-forked pool serving an inherited listening socket. "
        "Settings also come from a --config file and SPOON_* variables.",
    )
    p.add_argument("--fd", type=int, help="inherited bound (listening) socket (required to serve)")
    p.add_argument("--udp", action="store_true", help="the callable returns a DatagramProtocol")
    # --target (the server class, or a callable returning a Twisted protocol factory),
    # --workers, the timeouts, --reactor, --uid/--gid, the log settings: spoon.config's.
    config.add_arguments(p, "prefork")
    p.add_argument(
        "--proxy-protocol",
        action="store_true",
        help="connections start with a PROXY protocol header (a haproxy:tcp: endpoint); "
        "a spoon stream server class only",
    )
    p.add_argument(
        "--tls",
        action="append",
        metavar="KEYWORD=VALUE",
        help="serve TLS with this setting of an ssl: endpoint (privateKey=, certKey=, "
        "extraCertChain=, dhParameters=, caCertsDir=); repeated; a spoon stream server class only",
    )
    return p


#: Imported before switching user, beyond :data:`spoon.pool.worker.PRELOAD`: what the pool may
#: need later and could not import once the interpreter's files are out of reach (an
#: interpreter under a directory only root can read, say).
PRELOAD_BEFORE_SWITCH = (
    "spoon.greenio",
    "spoon.server",
    "twisted.internet.pollreactor",
    "twisted.internet.selectreactor",
    "twisted.application.reactors",
)


def user_ids(uid, gid):
    """(uid, gid, user name) from names or numbers; gid defaults to the user's group."""
    import grp
    import pwd

    name = None
    if uid is not None:
        if str(uid).isdigit():
            uid = int(uid)
            try:
                entry = pwd.getpwuid(uid)
            except KeyError:
                entry = None  # a number without a passwd entry: it needs --gid
                if gid is None:
                    raise KeyError("uid %d has no passwd entry: give --gid" % uid) from None
        else:
            entry = pwd.getpwnam(uid)
        if entry is not None:
            uid, name = entry.pw_uid, entry.pw_name
            if gid is None:
                gid = entry.pw_gid
    if gid is not None:
        gid = int(gid) if str(gid).isdigit() else grp.getgrnam(gid).gr_gid
    return uid, gid, name


def switch_user(uid, gid, name=None):
    """Become ``uid``/``gid`` (either may be None): group first, while still allowed,
    with the user's supplementary groups (or only ``gid`` for a uid without a name)."""
    if gid is not None and gid != os.getgid():
        os.setgid(gid)
    if uid is not None and uid != os.getuid():
        try:
            os.initgroups(name, gid if gid is not None else os.getgid())
        except (TypeError, KeyError, OSError):
            os.setgroups([gid if gid is not None else os.getgid()])
        os.setuid(uid)
    elif gid is not None and os.geteuid() == 0:
        os.setgroups([gid])


def _given(cfg, name):
    """A setting's value, or None where only the default set it (the target decides)."""
    return cfg.values.get(name) if cfg.source(name) != "default" else None


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    cfg = config.from_arguments(args, "prefork")
    status = config.check_and_print(cfg)
    if status is not None:
        return status
    log = logging.getLogger("spoon.prefork")
    if cfg.errors:
        logs.setup_logging(log_format=cfg.log_format or "text")
        for error in cfg.errors:
            log.error("%s", error)
        return 2
    if args.fd is None:
        parser.error("--fd is required to serve: the inherited listening socket")
    logs.configure(cfg)
    # Die with the process that started us (twistd): a graceful stop of the pool.
    parent = os.getppid()
    linux.set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:
        log.error("Parent exited before the supervisor started")
        return 1
    try:
        sock = socket.socket(fileno=args.fd)
    except OSError as e:
        log.error("--fd %d is not a usable socket: %s", args.fd, e)
        return 2
    if sock.type == socket.SOCK_DGRAM:
        args.udp = True
    reactor_module = None
    if cfg.reactor:
        try:
            reactor_module = check_reactor_choice(cfg.reactor).moduleName
        except ValueError as e:
            log.error("%s", e)
            return 2
    if cfg.uid is not None or cfg.gid is not None:
        # Everything the pool imports is imported now, while this process may still read
        # it: the target's module (imported by the configuration), the workers' modules,
        # the reactor's.
        try:
            uid, gid, name = user_ids(cfg.uid, cfg.gid)
        except (KeyError, ValueError) as e:
            log.error("--uid %s --gid %s: no such user or group (%s)", cfg.uid, cfg.gid, e)
            return 2
        worker.preload(PRELOAD_BEFORE_SWITCH + ((reactor_module,) if reactor_module else ()))
        try:
            switch_user(uid, gid, name)
        except OSError as e:
            log.error("Cannot switch to uid %s gid %s: %s", uid, gid, e)
            return 2
        log.info("Supervisor runs as uid %d gid %d", os.getuid(), os.getgid())
        # A change of credentials clears the parent-death signal: set it again.
        linux.set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != parent:
            log.error("Parent exited while the supervisor switched user")
            return 1
    try:
        server = pool_target(sock, cfg.server_class, name=cfg.server)
    except Exception as e:
        log.error("Cannot build the pool's server from %s: %s", cfg.server, e)
        return 2
    config.apply_server_attributes(cfg, server)
    if args.proxy_protocol:
        if not hasattr(server, "proxy_protocol") or args.udp:
            log.error("%s: the PROXY protocol needs a spoon stream server class", args.target)
            return 2
        server.proxy_protocol = True
    if args.tls:
        if not hasattr(server, "tls") or args.udp:
            log.error("%s: TLS needs a spoon stream server class", args.target)
            return 2
        try:
            server.tls = tls.from_arguments(args.tls)
            tls.certificate_options(server.tls)  # a missing or bad file fails here, not per worker
        except Exception as e:
            log.error("Cannot serve TLS: %s", e)
            return 2
    supervisor = Supervisor(
        server,
        workers=_given(cfg, "workers"),
        graceful_timeout=_given(cfg, "graceful_timeout"),
        worker_timeout=_given(cfg, "worker_timeout"),
        parent_pid=parent if parent != 1 else None,
        reactor_name=cfg.reactor,
        metrics_endpoint=cfg.metrics,
        statsd=cfg.statsd,
    )
    try:
        supervisor.run()
    except CannotFork as e:
        log.error("%s", e)
        return 3
    finally:
        try:
            sock.close()
        except Exception:
            pass
    return 0
