"""Naming what to serve: a spoon server class or a factory callable, by dotted path.

``twistd spoon --server``, ``python -m spoon.daemon KLASS``, ``python -m spoon.prefork
--target`` and the embedding service all take a dotted path from an operator; a mistyped one
must fail with a message that names it, before anything starts.
"""

import importlib
import inspect
import signal
import socket
import sys

__all__ = [
    "TargetError",
    "resolve",
    "server_class",
    "is_server_class",
    "is_datagram_server_class",
    "is_spork",
    "check_endpoint_kind",
    "build_server",
    "pool_target",
    "check_handler",
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



def _server_module():
    """:mod:`spoon.server` if it is imported, else None.

    A spoon server class exists only once that module has been imported (the class was
    made from it), so asking ``sys.modules`` answers every question here without importing
    it: this module, and :mod:`spoon.config` which reads it, stay importable from
    :mod:`spoon.server` itself (its ``serve_forever`` reads the configuration) without an
    import cycle."""
    return sys.modules.get("spoon.server")


def _is_subclass(obj, *names):
    """Whether ``obj`` is a subclass of one of the :mod:`spoon.server` classes ``names``:
    the one test of "is this a spoon server class"."""
    server = _server_module()
    if server is None or not isinstance(obj, type):
        return False
    return issubclass(obj, tuple(getattr(server, n) for n in names))


def is_server_class(obj):
    """True for spoon server classes (TCPSpoon, UDPSpoon, TCPSpork, UDPSpork, subclasses)."""
    return _is_subclass(obj, "TCPSpoon", "UDPSpoon", "TCPSpork", "UDPSpork")


def is_datagram_server_class(obj):
    return _is_subclass(obj, "UDPSpoon", "UDPSpork")


def is_spork(klass):
    """True for pre-forking server classes (TCPSpork/UDPSpork and their subclasses)."""
    return _is_subclass(klass, "TCPSpork", "UDPSpork")


def check_endpoint_kind(klass, datagram, description):
    """ValueError unless a UDP server class gets a datagram endpoint and a TCP one a stream
    endpoint (``datagram``: whether ``description`` names a datagram socket)."""
    if not is_server_class(klass):
        return
    wants_datagram = is_datagram_server_class(klass)
    if datagram != wants_datagram:
        raise ValueError(
            "%s is a %s server but the endpoint is %s (%s)"
            % (
                klass.__name__,
                "UDP" if wants_datagram else "TCP",
                "UDP" if datagram else "TCP",
                description,
            )
        )


def _accepts_bind_and_activate(klass):
    try:
        parameters = inspect.signature(klass.__init__).parameters
    except (TypeError, ValueError):
        return False
    return "bind_and_activate" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


_HANDLED_BY_SERVERS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


def _construct_around(klass, sock, address):
    """``klass(address)`` adopting ``sock`` instead of binding (whatever its ``__init__``
    looks like): see :func:`spoon.server.using_socket`."""
    with _server_module().using_socket(sock):
        return klass(address)


def build_server(klass, address):
    """Construct ``klass`` without binding its address and without letting it take over
    signal handlers: the service listens for it, and the host program (twistd) owns the
    signals.

    ``Klass(address, bind_and_activate=False)`` when the constructor accepts it; otherwise
    the server adopts a placeholder socket.
    """
    saved = {signum: signal.getsignal(signum) for signum in _HANDLED_BY_SERVERS}
    try:
        if _accepts_bind_and_activate(klass):
            return klass(address, bind_and_activate=False)
        family = socket.AF_INET6 if ":" in str(address[0]) else socket.AF_INET
        socktype = socket.SOCK_DGRAM if is_datagram_server_class(klass) else socket.SOCK_STREAM
        placeholder = socket.socket(family, socktype)
        try:
            server = _construct_around(klass, placeholder, address)
        finally:
            placeholder.close()
        server.socket = None
        return server
    finally:
        for signum, handler in saved.items():
            if handler is not None and signal.getsignal(signum) is not handler:
                signal.signal(signum, handler)


def _type_name(sock_type):
    return {socket.SOCK_STREAM: "stream (TCP)", socket.SOCK_DGRAM: "datagram (UDP)"}.get(
        sock_type, str(sock_type)
    )


def pool_target(sock, obj, name=None):
    """The :class:`spoon.pool.target.IPoolTarget` serving ``obj`` on ``sock`` (bound,
    listening for streams): a spoon server class built around the socket, or a callable
    returning a Twisted factory (a ``DatagramProtocol`` for a datagram socket), wrapped in
    :class:`spoon.pool.factory.FactoryTarget`.  ``name``: the dotted path, for titles."""
    if is_server_class(obj):
        if obj.socket_type != sock.type:
            raise ValueError(
                "%s serves %s sockets but descriptor %d is a %s socket"
                % (obj.__name__, _type_name(obj.socket_type), sock.fileno(), _type_name(sock.type))
            )
        return _construct_around(obj, sock, sock.getsockname())
    if not callable(obj):
        raise ValueError("%r is neither a spoon server class nor a callable" % (obj,))
    from spoon.pool.factory import FactoryTarget

    return FactoryTarget(sock, obj, name)


def check_handler(klass):
    """The server class ``klass``'s own check of its handler (``handler_klass`` a Gulp
    that implements ``handle()``): TypeError with the one-line reason."""
    _server_module().check_handler_class(klass)


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
