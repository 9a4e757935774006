"""The few Linux kernel facilities the pre-fork layer needs, reached through ctypes and
``setsockopt``: no extra dependency.

- :func:`set_parent_death_signal`: the kernel signals a child when its parent dies, so a
  worker (or a supervisor started by twistd) never outlives the process that owns it, even
  when that process is killed with SIGKILL.
- :func:`process_stat`: the fields of ``/proc/PID/stat`` (state, parent, CPU times...).
- :func:`refuse_new_connections` / :func:`accept_new_connections`: a socket filter on a
  listening TCP socket that drops fresh SYNs.  A graceful stop of the whole pool attaches it
  first, so that the workers can drain the accept queue to empty before the last descriptor
  closes: no client whose connection the kernel already completed is reset.  A dropped SYN
  is retried by the client and then refused once the socket is closed, which is what a
  stopped server should answer.
"""

import ctypes
import errno
import os
import socket
import struct

PR_SET_PDEATHSIG = 1
SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27

# Classic BPF, run by the kernel on every packet reaching the listening socket, with offset 0
# at the TCP header: load the flags byte, keep SYN and ACK, drop when only SYN is set (a new
# connection attempt), keep everything else (the ACK completing a handshake already under
# way, data for connections not yet accepted).
_TCP_FLAGS_OFFSET = 13
_SYN = 0x02
_ACK = 0x10
_DROP_SYN_PROGRAM = (
    (0x30, 0, 0, _TCP_FLAGS_OFFSET),  # ldb [13]
    (0x54, 0, 0, _SYN | _ACK),  # and #0x12
    (0x15, 0, 1, _SYN),  # jeq #0x02, next, skip one
    (0x06, 0, 0, 0),  # ret #0: drop
    (0x06, 0, 0, 0xFFFFFFFF),  # ret #-1: keep the whole packet
)

_libc = None


def _prctl(option, arg):
    global _libc
    if _libc is None:
        # The C library this interpreter already uses.  Not ctypes.util.find_library(),
        # which runs ldconfig in a subprocess: a fork and an exec in every new worker.
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def set_parent_death_signal(signum):
    """Ask the kernel to send ``signum`` to this process when its parent exits.

    Returns False where prctl is not available (the caller then relies on polling
    ``os.getppid()``).  The setting is per process and cleared in children of ``fork``.
    """
    try:
        _prctl(PR_SET_PDEATHSIG, int(signum))
    except (OSError, AttributeError):
        return False
    return True


def process_stat(pid):
    """The fields of ``/proc/PID/stat`` after the command name, as strings: index 0 is the
    state ("Z" for a zombie), 1 the parent pid, 11 and 12 the user and system CPU ticks.
    The command name is skipped by its last ")", since it may contain spaces and
    parentheses.  OSError when the process does not exist."""
    with open("/proc/%d/stat" % pid) as f:
        return f.read().rsplit(")", 1)[1].split()


def process_ids():
    """The pids of every process visible in /proc."""
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def refuse_new_connections(sock):
    """Drop new connection attempts (SYNs) on the listening TCP socket ``sock``; the accept
    queue and handshakes under way are untouched.  Returns False if the kernel refused."""
    if sock.type != socket.SOCK_STREAM:
        return False
    code = b"".join(struct.pack("HBBI", *insn) for insn in _DROP_SYN_PROGRAM)
    buf = ctypes.create_string_buffer(code, len(code))
    # struct sock_fprog {unsigned short len; struct sock_filter *filter;}, native alignment.
    prog = struct.pack("HP", len(_DROP_SYN_PROGRAM), ctypes.addressof(buf))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, prog)
    except OSError:
        return False
    return True


def accept_new_connections(sock):
    """Remove the filter of :func:`refuse_new_connections` (no error if there is none)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.ENOPROTOOPT, errno.EBADF):
            raise


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes(pid="self"):
    """Resident set size of a process (default: this one), in bytes; 0 if unknown."""
    try:
        with open("/proc/%s/statm" % pid, "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0
