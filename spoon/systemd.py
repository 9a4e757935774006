"""What systemd hands a service and what it asks back: socket activation and readiness.

- Socket activation: systemd binds the sockets of a ``.socket`` unit and starts the service
  with them as descriptors 3, 4, ... and ``LISTEN_PID``/``LISTEN_FDS``/``LISTEN_FDNAMES`` in
  the environment (sd_listen_fds(3)).  :func:`listen_sockets` takes them once; a pool's
  supervisor then hands them to its workers like sockets it bound itself.
- Readiness (``Type=notify``): state lines sent as one datagram to ``$NOTIFY_SOCKET``
  (sd_notify(3)): ``READY=1`` once the service serves, ``RELOADING=1`` then ``READY=1`` around
  a reload, ``STOPPING=1``, ``MAINPID=``, and ``WATCHDOG=1`` at least every half of
  ``$WATCHDOG_USEC`` while healthy.  :class:`Notifier` sends them; without ``NOTIFY_SOCKET``
  (not run by systemd) every call does nothing.

The protocol is small and stable, so it is spoken here directly rather than through a
binding to libsystemd.
"""

import os
import socket
import time

__all__ = ["LISTEN_FDS_START", "listen_sockets", "Notifier"]

#: The first descriptor systemd passes (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3


def listen_sockets(environ=None, unset=True):
    """The sockets systemd passed to this process, in order, as ``socket.socket`` objects
    (family and type as the kernel reports them); ``[]`` when none were passed to *this*
    process (``LISTEN_PID`` names another one, e.g. a parent that did not take them).

    ``unset``: remove the variables, so that a child started later does not take the same
    descriptors for its own (sd_listen_fds' ``unset_environment``).  The sockets' names
    (``LISTEN_FDNAMES``) are :func:`listen_names`, to be read first.
    """
    env = os.environ if environ is None else environ
    try:
        pid = int(env.get("LISTEN_PID", ""))
        count = int(env.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    if pid != os.getpid() or count <= 0:
        return []
    sockets = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        sockets.append(socket.socket(fileno=fd))
    if unset:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(name, None)
    return sockets


def listen_names(environ=None):
    """The names of the passed sockets (``FileDescriptorName=`` of the socket unit), in
    order; read before :func:`listen_sockets` unsets them."""
    env = os.environ if environ is None else environ
    names = env.get("LISTEN_FDNAMES", "")
    return names.split(":") if names else []


class Notifier:
    """Send state changes to systemd's notification socket (nothing without one).

    ``environ``: where ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` are read
    (default ``os.environ``), once, at construction.
    """

    def __init__(self, environ=None):
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        if address and address.startswith("@"):
            address = "\0" + address[1:]  # the abstract namespace
        self.address = address
        self.watchdog_usec = self._watchdog_usec(env)

    @staticmethod
    def _watchdog_usec(env):
        try:
            usec = int(env.get("WATCHDOG_USEC", ""))
        except ValueError:
            return None
        watched = env.get("WATCHDOG_PID")
        if watched and watched != str(os.getpid()):
            return None
        return usec if usec > 0 else None

    @property
    def enabled(self):
        return self.address is not None

    @property
    def watchdog_interval(self):
        """Seconds between two ``WATCHDOG=1`` pings (half the timeout systemd set), or
        None when systemd watches nothing."""
        if self.watchdog_usec is None or not self.enabled:
            return None
        return self.watchdog_usec / 2e6

    def send(self, *states):
        """Send ``states`` ("READY=1", ...) as one message; False when there is nobody to
        tell or the socket refused it (systemd gone: the service goes on)."""
        if not self.enabled:
            return False
        message = "\n".join(states).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.connect(self.address)
                sock.sendall(message)
            except OSError:
                return False
        return True

    def ready(self, status=None, mainpid=None):
        states = ["READY=1"]
        if mainpid is not None:
            states.append("MAINPID=%d" % mainpid)
        if status:
            states.append("STATUS=%s" % status)
        return self.send(*states)

    def reloading(self):
        # MONOTONIC_USEC lets Type=notify-reload services tell this reload from the next.
        usec = int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6)
        return self.send("RELOADING=1", "MONOTONIC_USEC=%d" % usec)

    def stopping(self):
        return self.send("STOPPING=1")

    def status(self, text):
        return self.send("STATUS=%s" % text)

    def watchdog(self):
        return self.send("WATCHDOG=1")
