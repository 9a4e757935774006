"""``python -m spoon.pool --fd FD --target DOTTED.PATH`` (also ``python -m spoon.prefork``):
a supervisor around an inherited listening socket.  That is how a process with a running
reactor (twistd, the embedding service) gets a pool without forking its own reactor: it
binds, then executes this with the socket as an inherited descriptor.
"""

import argparse
import importlib
import logging
import os
import signal
import socket
import sys

from spoon import linux
from spoon.pool import worker
from spoon.pool.reactor import CannotFork, check_reactor_choice
from spoon.pool.supervisor import Supervisor
from spoon.targets import pool_target, resolve

__all__ = ["main", "switch_user", "user_ids", "PRELOAD_BEFORE_SWITCH"]

LOG_FORMAT = "%(asctime)s [%(process)d] %(name)s %(levelname)s: %(message)s"


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m spoon.prefork",
        description="Supervise a pre-forked pool serving an inherited listening socket.",
    )
    p.add_argument("--fd", type=int, required=True, help="inherited bound (listening) socket")
    p.add_argument(
        "--target",
        required=True,
        help="dotted path of a spoon server class, or of a callable returning a Twisted "
        "protocol factory",
    )
    p.add_argument("--workers", type=int, default=None, help="default: the class's prefork")
    p.add_argument("--graceful-timeout", type=float, default=None)
    p.add_argument("--worker-timeout", type=float, default=None)
    p.add_argument("--udp", action="store_true", help="the callable returns a DatagramProtocol")
    p.add_argument(
        "--proxy-protocol",
        action="store_true",
        help="connections start with a PROXY protocol header (a haproxy:tcp: endpoint); "
        "a spoon stream server class only",
    )
    p.add_argument(
        "--reactor",
        default=None,
        metavar="NAME",
        help="reactor the workers install, by twistd short name (epoll, poll, select, "
        "asyncio...); default: Twisted's default",
    )
    p.add_argument(
        "--uid",
        default=None,
        help="user (name or number) the supervisor and its workers run as: switched to "
        "after the imports, before the server is built and any worker forked",
    )
    p.add_argument("--gid", default=None, help="group (name or number); default: the user's")
    p.add_argument("--log-level", default="INFO")
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


def _target_module(path):
    module = path.rpartition(".")[0]
    while module:
        try:
            return importlib.import_module(module)
        except ImportError:
            module = module.rpartition(".")[0]
        except Exception:
            return None  # reported when the target is resolved
    return None


def main(argv=None):
    args = _parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(), format=LOG_FORMAT)
    log = logging.getLogger("spoon.prefork")
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
    if args.reactor:
        try:
            reactor_module = check_reactor_choice(args.reactor).moduleName
        except ValueError as e:
            log.error("%s", e)
            return 2
    if args.uid is not None or args.gid is not None:
        # Everything the pool imports is imported now, while this process may still read
        # it: the target's module, the workers' modules, the reactor's.
        try:
            uid, gid, name = user_ids(args.uid, args.gid)
        except (KeyError, ValueError) as e:
            log.error("--uid %s --gid %s: no such user or group (%s)", args.uid, args.gid, e)
            return 2
        _target_module(args.target)
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
        server = pool_target(sock, resolve(args.target), name=args.target)
    except Exception as e:
        log.error("Cannot build the pool's server from %s: %s", args.target, e)
        return 2
    if args.proxy_protocol:
        if not hasattr(server, "proxy_protocol") or args.udp:
            log.error("%s: the PROXY protocol needs a spoon stream server class", args.target)
            return 2
        server.proxy_protocol = True
    supervisor = Supervisor(
        server,
        workers=args.workers,
        graceful_timeout=args.graceful_timeout,
        worker_timeout=args.worker_timeout,
        parent_pid=parent if parent != 1 else None,
        reactor_name=args.reactor,
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

