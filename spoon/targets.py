"""Naming what to serve: a spoon server class or a factory callable, by dotted path.

``twistd spoon --server``, ``python -m spoon.daemon KLASS``, ``python -m spoon.prefork
--target`` and the embedding service all take a dotted path from an operator; a mistyped one
must fail with a message that names it, before anything starts.
"""

import importlib
import inspect
import signal
import socket

__all__ = [
    "TargetError",
    "resolve",
    "server_class",
    "is_server_class",
    "is_datagram_server_class",
    "is_spork",
    "build_server",
]


class TargetError(ValueError):
    """A dotted path that cannot be imported, or does not name what it should."""




def resolve(path):
    """Import the object named by ``path`` ("package.module.Name" or "package.module:Name").

    Raises :class:`TargetError` naming ``path`` when that fails, because "No module named
    'x'" alone does not tell a daemon's operator which option was wrong.
    """
    if not isinstance(path, str) or not (":" in path or "." in path.strip(".")):
        raise TargetError("%r is not a dotted path (expected package.module.Name)" % (path,))
    if ":" in path:
        module_name, _, attribute = path.partition(":")
    else:
        module_name, _, attribute = path.rpartition(".")
    if not module_name or not attribute:
        raise TargetError("%r is not a dotted path (expected package.module.Name)" % (path,))
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise TargetError("cannot import %r: %s: %s" % (path, type(e).__name__, e)) from e
    try:
        obj = module
        for part in attribute.split("."):
            obj = getattr(obj, part)
    except AttributeError as e:
        raise TargetError(
            "cannot import %r: module %r has no attribute %r" % (path, module_name, attribute)
        ) from e
    return obj




def is_server_class(obj):
    from spoon import server

    return isinstance(obj, type) and issubclass(
        obj, (server.TCPSpoon, server.UDPSpoon, server.TCPSpork, server.UDPSpork)
    )


def is_datagram_server_class(obj):
    from spoon import server

    return is_server_class(obj) and issubclass(obj, (server.UDPSpoon, server.UDPSpork))




def _accepts_bind_and_activate(klass):
    try:
        parameters = inspect.signature(klass.__init__).parameters
    except (TypeError, ValueError):
        return False
    return "bind_and_activate" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


_HANDLED_BY_SERVERS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


def build_server(klass, address):
    """Construct ``klass`` without binding its address and without letting it take over
    signal handlers: the service listens for it, and the host program (twistd) owns the
    signals.

    ``Klass(address, bind_and_activate=False)`` when the constructor accepts it; otherwise
    the server adopts a placeholder socket through :func:`spoon.server.using_socket`.
    """
    from spoon.server import using_socket

    saved = {signum: signal.getsignal(signum) for signum in _HANDLED_BY_SERVERS}
    try:
        if _accepts_bind_and_activate(klass):
            return klass(address, bind_and_activate=False)
        family = socket.AF_INET6 if ":" in str(address[0]) else socket.AF_INET
        socktype = socket.SOCK_DGRAM if is_datagram_server_class(klass) else socket.SOCK_STREAM
        placeholder = socket.socket(family, socktype)
        try:
            with using_socket(placeholder):
                server = klass(address)
        finally:
            placeholder.close()
        server.socket = None
        return server
    finally:
        for signum, handler in saved.items():
            if handler is not None and signal.getsignal(signum) is not handler:
                signal.signal(signum, handler)


def server_class(path):
    """Import the spoon server class named by ``path``; :class:`TargetError` (naming the
    path) when it cannot be imported or is not a spoon server class."""
    klass = resolve(path)
    if not is_server_class(klass):
        raise TargetError(
            "%s is not a spoon server class (a subclass of spoon.server.TCPSpoon, UDPSpoon, "
            "TCPSpork or UDPSpork)" % path
        )
    return klass


def is_spork(klass):
    """True for pre-forking server classes (TCPSpork/UDPSpork and their subclasses)."""
    from spoon.server import TCPSpork, UDPSpork

    return issubclass(klass, (TCPSpork, UDPSpork))
