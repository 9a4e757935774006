"""What a pool's workers have done, and how the supervisor learns it.

Each worker keeps its counters as plain ints on one process-wide object (:data:`COUNTERS`):
the request path only adds to attributes, no lock and no system call.  Once per heartbeat
the worker copies them into a small shared-memory block that the supervisor mapped before
forking it (:class:`CounterBlock`, a fixed-size record); the supervisor reads the blocks
whenever it publishes (status file, metrics), so a worker never waits on the supervisor and
a stuck worker still shows its last record (and the age of it).

The supervisor side (:class:`PoolStats`) adds what only it sees: worker starts, deaths and
their cause, retirements and recycles, and keeps one row per live worker.

Shared memory rather than the heartbeat pipe: the pipe's bytes mean "ready" and "alive"
and are read in the supervisor's loop; counters in a mapping need no framing, no parsing of
a byte stream, and cost the supervisor nothing until it looks.
"""

import mmap
import os
import resource
import struct
import time

__all__ = [
    "COUNTERS",
    "COUNTER_FIELDS",
    "WorkerCounters",
    "CounterBlock",
    "PoolStats",
    "exit_cause",
    "retirement_reason",
    "EXIT_CAUSES",
]

#: The counters a worker keeps, in record order (all non-negative integers).
COUNTER_FIELDS = (
    "connections_open",
    "connections_total",
    "requests_started",
    "requests_finished",
    "errors",
    "peer_resets",
    "timeouts",
    "bytes_in",
    "bytes_out",
    "generation",
)

#: Written by the worker at each publication, after the counters.
SAMPLE_FIELDS = ("rss_bytes", "published_at_us", "pid")

#: A record: a sequence number (odd while the worker writes), then the fields.
SEQUENCE = struct.Struct("<Q")
RECORD = struct.Struct("<%dq" % (len(COUNTER_FIELDS) + len(SAMPLE_FIELDS)))

#: Why a worker's process ended, as the supervisor classifies it (metric label values).
EXIT_CAUSES = ("stopped", "retired", "timeout", "boot_failure", "crashed", "killed")

_PAGE = os.sysconf("SC_PAGE_SIZE")


class WorkerCounters:
    """Plain-int counters of this process, incremented where things happen."""

    __slots__ = COUNTER_FIELDS

    def __init__(self):
        self.reset()

    def reset(self):
        """Zero every counter but ``generation`` (a forked worker starts with the
        configuration its supervisor had loaded)."""
        generation = getattr(self, "generation", 0)
        for name in COUNTER_FIELDS:
            setattr(self, name, 0)
        self.generation = generation

    def values(self):
        return tuple(getattr(self, name) for name in COUNTER_FIELDS)


#: This process's counters (a worker's, or a single-process server's).
COUNTERS = WorkerCounters()


def _rss_bytes():
    """Resident set size of this process (from /proc; the peak where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class CounterBlock:
    """One worker's record in memory shared with the supervisor (mapped before fork).

    The worker is the only writer; a reader retries while a write is under way (an odd or
    changed sequence number), so it never sees half of two records.
    """

    def __init__(self):
        self._map = mmap.mmap(-1, SEQUENCE.size + RECORD.size)
        self._seq = 0

    def publish(self, counters, now=None):
        """In the worker: copy ``counters`` into the block, with RSS and time."""
        now = time.time() if now is None else now
        values = counters.values() + (_rss_bytes(), int(now * 1e6), os.getpid())
        block = self._map
        self._seq += 1
        SEQUENCE.pack_into(block, 0, self._seq)
        RECORD.pack_into(block, SEQUENCE.size, *values)
        self._seq += 1
        SEQUENCE.pack_into(block, 0, self._seq)

    def read(self, tries=5):
        """In the supervisor: the last complete record as a dict, or None (none yet)."""
        block = self._map
        for _ in range(tries):
            (before,) = SEQUENCE.unpack_from(block, 0)
            values = RECORD.unpack_from(block, SEQUENCE.size)
            (after,) = SEQUENCE.unpack_from(block, 0)
            if before == after and before % 2 == 0:
                break
        else:
            return None
        if before == 0:
            return None
        record = dict(zip(COUNTER_FIELDS + SAMPLE_FIELDS, values))
        record["published_at"] = record.pop("published_at_us") / 1e6
        return record

    def close(self):
        self._map.close()


def exit_cause(record, status, stopping):
    """Why the worker of ``record`` (a supervisor's ``WorkerRecord``) ended with wait
    ``status``: one of :data:`EXIT_CAUSES`."""
    if stopping:
        return "stopped"
    if record.retiring:
        return "retired"
    if record.killed:
        return "timeout"
    if not record.ready:
        return "boot_failure"
    if status is not None and os.WIFSIGNALED(status):
        return "killed"
    return "crashed"


def retirement_reason(why):
    """The metric label of the supervisor's reason for stopping a worker."""
    if why.startswith("too many"):
        return "scale_down"
    if why.startswith("replaced"):
        return "replace"
    return why.split(":")[0].replace(" ", "_")


#: Deaths kept in the status for the operator to read (the newest last).
RECENT_DEATHS = 10


class PoolStats:
    """The supervisor's view of its workers' counters and lives.

    ``clock``: wall-clock seconds (ages are shown to people and compared across
    processes).  The supervisor calls :meth:`prepare_worker` just before each fork,
    :meth:`worker_started` after it (and :meth:`became_worker` in the child),
    :meth:`worker_exited` when it reaps one, :meth:`retiring` when it asks one to stop.
    """

    def __init__(self, clock=time.time):
        self.clock = clock
        self.started_at = clock()
        self.starts = 0
        self.deaths = dict.fromkeys(EXIT_CAUSES, 0)
        self.retirements = {}
        self.recycles = {}
        #: Sums of the counters of workers that have exited (pool totals survive them).
        self.departed = dict.fromkeys(COUNTER_FIELDS, 0)
        self.recent_deaths = []
        self._blocks = {}
        self._born = {}
        self._pending = None

    # -- the supervisor's events ---------------------------------------------------------

    def prepare_worker(self):
        """Map (and return) the block of the worker about to be forked."""
        if self._pending is not None:
            self._pending.close()  # the previous fork failed
        self._pending = CounterBlock()
        return self._pending

    def worker_started(self, pid):
        self.starts += 1
        self._blocks[pid], self._pending = self._pending, None
        self._born[pid] = self.clock()

    def became_worker(self):
        """In the forked child: publish into the block mapped for it, from zero."""
        block, self._pending = self._pending, None
        for other in self._blocks.values():
            other.close()
        self._blocks = {}
        COUNTERS.reset()
        return block

    def retiring(self, reason):
        """A worker was asked to stop (``reason``: scale_down, replace, recycle...)."""
        self.retirements[reason] = self.retirements.get(reason, 0) + 1

    def recycled(self, reason):
        """A worker asked to be replaced (its requests, its memory, a MemoryError:
        ``reason``); its retirement is counted when its successor replaces it."""
        self.recycles[reason] = self.recycles.get(reason, 0) + 1

    def worker_exited(self, record, status, stopping, detail=""):
        """``record`` (a ``WorkerRecord``) was reaped with wait ``status``; the cause."""
        cause = exit_cause(record, status, stopping)
        self.deaths[cause] += 1
        block = self._blocks.pop(record.pid, None)
        self._born.pop(record.pid, None)
        if block is not None:
            last = block.read()
            block.close()
            if last is not None:
                for name in COUNTER_FIELDS:
                    if name not in ("connections_open", "generation"):
                        self.departed[name] += last[name]
        self.recent_deaths.append(
            {"pid": record.pid, "worker": record.number, "cause": cause, "detail": detail,
             "at": self.clock()}
        )
        del self.recent_deaths[:-RECENT_DEATHS]
        return cause

    # -- reading -------------------------------------------------------------------------

    def snapshot(self, workers, beat_ages, pid, wanted, state, worker_timeout):
        """A plain dict (JSON-ready) of the pool now: ``workers`` are the supervisor's
        ``WorkerRecord`` objects, ``beat_ages`` their seconds since the last heartbeat."""
        now = self.clock()
        rows = []
        for w in sorted(workers, key=lambda w: w.number):
            block = self._blocks.get(w.pid)
            record = block.read() if block is not None else None
            age = beat_ages.get(w.pid)
            if w.killed:
                worker_state = "killed"
            elif w.retiring:
                worker_state = "retiring"
            elif not w.ready:
                worker_state = "booting"
            elif age is not None and age > worker_timeout / 2.0:
                worker_state = "late"
            else:
                worker_state = "serving"
            row = {
                "pid": w.pid,
                "worker": w.number,
                "state": worker_state,
                "age": now - self._born.get(w.pid, now),
                "heartbeat_age": age,
            }
            row.update(dict.fromkeys(COUNTER_FIELDS, 0))
            row["rss_bytes"] = 0
            if record is not None:
                for name in COUNTER_FIELDS + ("rss_bytes",):
                    row[name] = record[name]
                row["published_at"] = record["published_at"]
            rows.append(row)
        totals = dict(self.departed)
        for row in rows:
            for name in COUNTER_FIELDS:
                if name != "generation":
                    totals[name] += row[name]
        totals["connections_open"] = sum(row["connections_open"] for row in rows)
        return {
            "supervisor": {
                "pid": pid,
                "state": state,
                "age": now - self.started_at,
                "workers_wanted": wanted,
                "worker_timeout": worker_timeout,
                "written_at": now,
            },
            "workers": rows,
            "totals": totals,
            "worker_starts": self.starts,
            "worker_deaths": dict(self.deaths),
            "worker_retirements": dict(self.retirements),
            "worker_recycles": dict(self.recycles),
            "recent_deaths": list(self.recent_deaths),
        }

    def close(self):
        for block in list(self._blocks.values()) + [self._pending]:
            if block is not None:
                block.close()
        self._blocks = {}
        self._pending = None
