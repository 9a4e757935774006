"""What a service tells systemd: readiness, reloads, stopping, watchdog pings.

(Socket activation, the other direction, is Twisted's ``twisted.python.systemd.ListenFDs``,
used by :mod:`spoon.net` for ``systemd:`` endpoints.)

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

__all__ = ["Notifier"]

#: Seconds a message may wait for room in systemd's queue before it is given up: a
#: supervisor sends them from its loop, which must never stall on a busy manager.
SEND_TIMEOUT = 1.0


class Notifier:
    """Send state changes to systemd's notification socket (nothing without one).

    ``environ``: where ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` are read
    (default ``os.environ``), once, at construction; ``send_timeout``: how long a message
    waits when the manager's queue is full (it is dropped after that).
    """

    def __init__(self, environ=None, send_timeout=SEND_TIMEOUT):
        self.send_timeout = send_timeout
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
        tell, the socket refused it (systemd gone: the service goes on) or its queue stayed
        full for ``send_timeout`` seconds (a manager too busy to read: the next state or
        ping says it again)."""
        if not self.enabled:
            return False
        message = "\n".join(states).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(self.send_timeout)
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
