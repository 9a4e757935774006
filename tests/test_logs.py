"""spoon.logs.setup_logging: one place for server and Twisted records, a pid on each line,
log files that survive logrotate, across forked processes.

Each test configures logging in a child Python process: logging and Twisted's global log
are process-wide state that the test runner itself must not inherit.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from support import LOG_LINE, ROOT, SentryCollector



def run_python(source, *args, timeout=60, env=None):
    full_env = dict(os.environ, PYTHONPATH=ROOT)
    full_env.update(env or {})
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(source), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    return result


def parse(path_or_text, is_text=False):
    text = path_or_text if is_text else open(path_or_text).read()
    lines = text.splitlines()
    parsed = []
    for line in lines:
        match = LOG_LINE.match(line)
        assert match, "badly formed line: %r" % line
        _, level, pid, name, message = match.groups()
        parsed.append((int(pid), name, level, message))
    return parsed


FORKING = """
    import logging, os, sys
    from spoon.logs import setup_logging
    from twisted.logger import Logger

    log_file = sys.argv[1]
    setup_logging(log_file=log_file)
    server_log = logging.getLogger("spoon-server")
    twisted_log = Logger(namespace="some.twisted.thing")
    server_log.info("parent before fork")
    twisted_log.info("twisted event {n}", n=1)
    pids = []
    for worker in range(2):
        pid = os.fork()
        if pid == 0:
            for i in range(200):
                server_log.info("worker %d line %d", worker, i)
            twisted_log.warn("worker {w} twisted", w=worker)
            os._exit(0)
        pids.append(pid)
    for i in range(200):
        server_log.info("parent line %d", i)
    for pid in pids:
        assert os.waitpid(pid, 0)[1] == 0
    print(os.getpid(), *pids)
"""


def test_server_and_twisted_records_with_the_pid_of_each_process(tmp_path):
    log_file = str(tmp_path / "all.log")
    result = run_python(FORKING, log_file)
    parent, *workers = [int(word) for word in result.stdout.split()]
    lines = parse(log_file)
    by_pid = {}
    for pid, name, level, message in lines:
        by_pid.setdefault(pid, []).append((name, level, message))
    assert set(by_pid) == {parent, *workers}
    assert ("spoon-server", "INFO", "parent before fork") in by_pid[parent]
    assert ("some.twisted.thing", "INFO", "twisted event 1") in by_pid[parent]
    for index, pid in enumerate(workers):
        mine = [m for n, _, m in by_pid[pid] if n == "spoon-server"]
        # Every line of each process arrived whole, in order, in the one file.
        assert mine == ["worker %d line %d" % (index, i) for i in range(200)]
        assert ("some.twisted.thing", "WARNING", "worker %d twisted" % index) in by_pid[pid]
    assert len([m for n, _, m in by_pid[parent] if m.startswith("parent line")]) == 200


ROTATING = """
    import logging, os, sys
    from spoon.logs import setup_logging

    log_file = sys.argv[1]
    setup_logging(log_file=log_file)
    log = logging.getLogger("spoon-server")
    log.info("first")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(write_fd)
        os.read(read_fd, 1)  # wait until the parent has "rotated" the file
        log.info("child after rotation")
        os._exit(0)
    os.close(read_fd)
    os.rename(log_file, log_file + ".1")  # what logrotate does, then the next record...
    log.info("parent after rotation")
    os.write(write_fd, b"x")
    assert os.waitpid(pid, 0)[1] == 0
    print(os.getpid(), pid)
"""


def test_log_file_reopened_after_move_in_every_process(tmp_path):
    log_file = str(tmp_path / "rot.log")
    result = run_python(ROTATING, log_file)
    parent, child = [int(word) for word in result.stdout.split()]
    old = [(pid, message) for pid, _, _, message in parse(log_file + ".1")]
    new = [(pid, message) for pid, _, _, message in parse(log_file)]
    assert old == [(parent, "first")]
    assert sorted(new) == sorted([(parent, "parent after rotation"), (child, "child after rotation")])


LEVELS = """
    import io, logging, sys
    from spoon.logs import setup_logging

    stream = io.StringIO()
    setup_logging(level=logging.INFO, log_file=sys.argv[1], stream=stream,
                  stream_level=logging.WARNING)
    # Called again (e.g. after a reload): replaces its handlers, no doubled lines.
    setup_logging(level=logging.INFO, log_file=sys.argv[1], stream=stream,
                  stream_level=logging.WARNING)
    log = logging.getLogger("spoon-server")
    log.debug("not shown anywhere")
    log.info("file only")
    log.warning("both")
    sys.stdout.write(stream.getvalue())
"""


def test_levels_and_no_duplicates_when_called_twice(tmp_path):
    log_file = str(tmp_path / "lv.log")
    result = run_python(LEVELS, log_file)
    assert [m for _, _, _, m in parse(log_file)] == ["file only", "both"]
    assert [(lvl, m) for _, _, lvl, m in parse(result.stdout, is_text=True)] == [
        ("WARNING", "both")
    ]


DEFAULT_STDERR = """
    import logging
    from spoon.logs import setup_logging

    setup_logging()
    logging.getLogger("my-echo-server").info("to stderr")
"""


def test_stderr_by_default():
    result = run_python(DEFAULT_STDERR)
    [(pid, name, level, message)] = parse(result.stderr, is_text=True)
    assert (name, level, message) == ("my-echo-server", "INFO", "to stderr")


UNWRITABLE = """
    import sys
    from spoon.logs import setup_logging

    try:
        setup_logging(log_file=sys.argv[1])
    except OSError as e:
        print("OSError", e.filename)
"""


def test_unwritable_log_file_fails_at_once(tmp_path):
    missing = str(tmp_path / "nope" / "x.log")
    result = run_python(UNWRITABLE, missing)
    assert result.stdout.split() == ["OSError", missing]


SENTRY_MISSING = """
    from spoon.logs import SentryMissing, setup_logging

    try:
        setup_logging(sentry_dsn="http://key@127.0.0.1:9/1")
    except SentryMissing as e:
        print("MISSING:", e)
"""


def test_sentry_missing_is_an_error(tmp_path):
    blocker = tmp_path / "sentry_sdk"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('hidden for the test')\n")
    result = run_python(SENTRY_MISSING, env={"PYTHONPATH": os.pathsep.join([str(tmp_path), ROOT])})
    assert "MISSING: a Sentry DSN was given but sentry-sdk is not installed" in result.stdout


SENTRY = """
    import logging, sys
    import sentry_sdk
    from spoon.logs import setup_logging

    setup_logging(sentry_dsn=sys.argv[1])
    log = logging.getLogger("spoon-server")
    log.info("a breadcrumb")
    log.warning("reported to sentry %d", 42)
    sentry_sdk.flush(timeout=20)
"""


def test_sentry_receives_warnings(tmp_path):
    """With sentry-sdk installed (the ``sentry`` extra), warnings reach the DSN's server:
    here a real HTTP server on 127.0.0.1 that records what it is sent."""
    pytest.importorskip("sentry_sdk")
    with SentryCollector() as collector:
        run_python(SENTRY, collector.dsn(7))
    received = collector.received
    assert received, "nothing reached the Sentry server"
    assert any(path.startswith("/api/7/") for path, _ in received)
    assert any(b"reported to sentry 42" in body for _, body in received)
