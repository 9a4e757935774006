"""What the kernel says about a server: its process tree, CPU time and memory.

The load generator and the server share the machine's cores, so the honest cost of a
request is the server's own CPU time (utime + stime from /proc/PID/stat, summed over the
master, its workers and reaped children), not wall-clock throughput.
"""

import os

_TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid):
    """Fields of /proc/PID/stat after the command name (index 0 is the state)."""
    with open("/proc/%d/stat" % pid) as f:
        return f.read().rsplit(")", 1)[1].split()


def tree(root):
    """``root`` and all its living descendants (pids), from one scan of /proc."""
    parent_of = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = _stat_fields(int(entry))
        except (OSError, IndexError):
            continue
        if fields[0] == "Z":
            continue
        parent_of[int(entry)] = int(fields[1])
    if root not in parent_of:
        return []
    children = {}
    for pid, ppid in parent_of.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def descendants(root):
    """The living processes below ``root`` (a pre-fork supervisor's workers)."""
    return [pid for pid in tree(root) if pid != root]


def user_system_seconds(pids):
    """(user, system) CPU seconds of ``pids`` (all their threads), each with the CPU of
    children they have reaped (cutime, cstime: the forking servers' finished children)."""
    user = system = 0
    for pid in pids:
        try:
            f = _stat_fields(pid)
        except (OSError, IndexError):
            continue
        user += int(f[11]) + int(f[13])
        system += int(f[12]) + int(f[14])
    return user / _TICK, system / _TICK


def cpu_seconds(pids):
    """utime + stime of ``pids`` plus the CPU of children they have reaped."""
    return sum(user_system_seconds(pids))


def _status_kib(pid, key):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def rss_kib(pids):
    """Sum of VmRSS over ``pids`` (shared pages counted once per process)."""
    total = 0
    for pid in pids:
        try:
            total += _status_kib(pid, "VmRSS:")
        except OSError:
            pass
    return total


def hwm_kib(pid):
    """Peak resident set size of ``pid`` since start or :func:`reset_hwm`."""
    try:
        return _status_kib(pid, "VmHWM:")
    except OSError:
        return 0


def reset_hwm(pid):
    """Reset the peak RSS of ``pid`` to its current RSS (writing 5 to clear_refs).

    Returns False when not permitted (then the peak includes start-up)."""
    try:
        with open("/proc/%d/clear_refs" % pid, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def pss_kib(pids):
    """Sum of Pss over ``pids``: shared pages divided among the processes sharing them, so
    a pre-forked pool's copy-on-write memory is counted once in total."""
    total = 0
    for pid in pids:
        try:
            with open("/proc/%d/smaps_rollup" % pid) as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def fd_count(pids):
    total = 0
    for pid in pids:
        try:
            total += len(os.listdir("/proc/%d/fd" % pid))
        except OSError:
            pass
    return total


def threads(pid):
    try:
        return len(os.listdir("/proc/%d/task" % pid))
    except OSError:
        return 0
