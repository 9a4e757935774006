"""spoon.logs.setup_logging: one place for server and Twisted records, a pid on each line,
log files that survive logrotate, across forked processes.

Each test that configures logging does it in a child Python process: logging and Twisted's
global log are process-wide state that the test runner itself must not inherit.  Every line is
read with ``support.LOG_LINE``, written apart from ``spoon.logs``.
"""

import os
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, strategies as st

from spoon import logs
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


# -- one format for stdlib records and Twisted events --------------------------------------------

ONE_PROCESS = """
    import logging, os, sys
    from spoon import logs
    from twisted.logger import Logger, LogLevel
    from twisted.python import log as legacy

    logs.setup_logging(log_format=sys.argv[1])
    server_log = logging.getLogger("spoon-server")
    twisted_log = Logger(namespace="some.twisted.thing")
    server_log.info("stdlib says %s", "hi")
    twisted_log.warn("twisted says {word}", word="hello")
    try:
        1 / 0
    except ZeroDivisionError:
        server_log.exception("stdlib failed")
    try:
        {}["missing"]
    except KeyError:
        twisted_log.failure("twisted failed")
    legacy.msg("legacy message")
    relayed = {"pid": 4242, "logger": "gen-server", "level": "INFO", "message": "relayed",
               "time": "2026-01-02T03:04:05.678+00:00"}
    Logger(namespace="gen-server").emit(LogLevel.info, **logs.relayed_event(relayed))
    server_log.debug("below the level")
    print(os.getpid())
"""

EXPECTED = [
    ("INFO", "spoon-server", "stdlib says hi"),
    ("WARNING", "some.twisted.thing", "twisted says hello"),
    ("ERROR", "spoon-server", "stdlib failed"),
    ("CRITICAL", "some.twisted.thing", "twisted failed"),
    ("INFO", "twisted", "legacy message"),
    ("INFO", "gen-server", "relayed"),
]


def test_stdlib_and_twisted_lines_have_one_shape_in_one_process():
    result = run_python(ONE_PROCESS, "text")
    pid = int(result.stdout)
    headers, tracebacks = [], {}
    for line in result.stderr.splitlines():
        match = LOG_LINE.match(line)
        if match is None:
            assert line.startswith("\t") and headers, "badly formed line: %r" % line
            tracebacks.setdefault(headers[-1][3], []).append(line[1:])
            continue
        _, level, line_pid, name, message = match.groups()
        headers.append((level, int(line_pid), name, message))
    assert [(level, name, message) for level, _, name, message in headers] == EXPECTED
    assert [line_pid for _, line_pid, _, _ in headers] == [pid] * 5 + [4242]
    assert tracebacks["stdlib failed"][0] == "Traceback (most recent call last):"
    assert tracebacks["stdlib failed"][-1] == "ZeroDivisionError: division by zero"
    assert "KeyError: 'missing'" in "\n".join(tracebacks["twisted failed"])
    assert set(tracebacks) == {"stdlib failed", "twisted failed"}


def test_json_format_is_one_object_a_line_with_the_traceback_apart():
    import datetime
    import json

    result = run_python(ONE_PROCESS, "json")
    pid = int(result.stdout)
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert [(r["level"], r["logger"], r["message"]) for r in records] == EXPECTED
    assert [r["pid"] for r in records] == [pid] * 5 + [4242]
    relayed_at = datetime.datetime.fromisoformat(records[-1]["time"])
    assert relayed_at == datetime.datetime(2026, 1, 2, 3, 4, 5, 678000, datetime.timezone.utc)
    for record in records:
        assert {"time", "level", "pid", "logger", "message"} <= set(record)
        assert datetime.datetime.fromisoformat(record["time"]).tzinfo is not None
    with_traceback = {r["message"]: r["traceback"] for r in records if "traceback" in r}
    assert set(with_traceback) == {"stdlib failed", "twisted failed"}
    assert with_traceback["stdlib failed"].endswith("ZeroDivisionError: division by zero")
    assert "KeyError: 'missing'" in with_traceback["twisted failed"]


_CHARACTERS = st.one_of(st.characters(blacklist_categories=("Cs",)),
                        st.sampled_from("\r\n\x0b\x0c\x1c\x85\u2028 \t"))
_NAMES = st.text(_CHARACTERS, max_size=20)


@given(
    st.sampled_from(logs.LEVEL_NAMES), st.integers(1, 2 ** 22), _NAMES,
    st.text(_CHARACTERS),
    st.sampled_from(["text", "json"]),
)
def test_a_rendered_line_parses_back_to_its_fields(level, pid, logger, message, log_format):
    """What the pool's log relay relies on: parse_line(render(...)) gives the fields back;
    a text record's first line always has the one shape, and its other lines start with a
    tab (a logger name's blanks become "_", an empty one "-")."""
    text = logs.render(1795849400.25, level, pid, logger, message, None, log_format)
    if log_format == "json":
        assert "\n" not in text
        expected_logger, expected_message = logger, message
    else:
        first, *rest = text.splitlines()
        assert all(line.startswith("\t") for line in rest), text
        text = first
        expected_logger = "".join("_" if c.isspace() else c for c in logger) or "-"
        expected_message = (message.splitlines() or [""])[0]
    fields = logs.parse_line(text)
    assert (fields["level"], fields["pid"], fields["logger"], fields["message"]) == (
        level, pid, expected_logger, expected_message)


# -- a plain script ------------------------------------------------------------------------------

PLAIN_SCRIPT = """
    import logging, sys
    from spoon import config, logs
    from spoon.examples import EchoServer

    if sys.argv[1] == "configured":
        logging.basicConfig(level=logging.INFO, format="%(name)s said %(message)s")
    settings = config.build("script", server_class=EchoServer) if sys.argv[1] == "env" else None
    print(logs.ensure_default_logging("my-echo-server", settings))
    logging.getLogger("my-echo-server").info("listening on tcp 127.0.0.1:1")
    logging.getLogger("my-echo-server").debug("debug detail")
"""


def test_a_plain_script_logs_its_start_to_stderr_by_default():
    result = run_python(PLAIN_SCRIPT, "plain")
    assert result.stdout == "True\n"
    [(pid, name, level, message)] = parse(result.stderr, is_text=True)
    assert (name, level, message) == ("my-echo-server", "INFO", "listening on tcp 127.0.0.1:1")


def test_a_plain_script_follows_the_spoon_environment_variables():
    import json

    result = run_python(PLAIN_SCRIPT, "env", env={"SPOON_LOG_FORMAT": "json", "SPOON_LOG_LEVEL": "debug"})
    assert result.stdout == "True\n"
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert [r["message"] for r in records] == ["listening on tcp 127.0.0.1:1", "debug detail"]


def test_a_script_that_configured_logging_keeps_its_own():
    result = run_python(PLAIN_SCRIPT, "configured")
    assert result.stdout == "False\n"
    assert result.stderr == "my-echo-server said listening on tcp 127.0.0.1:1\n"


def test_twistd_observer_writes_spoon_lines_to_the_log_file_and_rotates_it(tmp_path):
    import json

    from twisted.logger import LogLevel

    path = str(tmp_path / "twistd.log")
    observer, log_file = logs.twistd_observer({"logfile": path}, "json", logs.level_number("info"))
    event = {"log_format": "hello {who}", "who": "there", "log_level": LogLevel.info,
             "log_namespace": "a.b", "log_time": 1795849400.0}
    observer(event)
    observer(dict(event, log_level=LogLevel.debug))  # below the level: dropped
    log_file.rotate()
    observer(dict(event, who="again"))
    log_file.close()
    first = [json.loads(line) for line in open(path + ".1")]
    assert [(r["logger"], r["message"], r["pid"]) for r in first] == [("a.b", "hello there", os.getpid())]
    assert [json.loads(line)["message"] for line in open(path)] == ["hello again"]


def test_examples_pool_writes_json_from_every_process_to_one_file(tmp_path):
    """``python -m spoon.examples -s 2 --log-format json -L FILE``: the supervisor's and
    each worker's records, stdlib's and Twisted's, one JSON object a line."""
    import json
    import signal

    from support import children_of, request, wait_for

    log_file = str(tmp_path / "pool.log")
    proc = subprocess.Popen(
        [sys.executable, "-m", "spoon.examples", "-P", "0", "-I", "127.0.0.1", "-s", "2",
         "--log-format", "json", "-L", log_file],
        env=dict(os.environ, PYTHONPATH=ROOT), stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        def records():
            try:
                with open(log_file) as f:
                    return [json.loads(line) for line in f]
            except FileNotFoundError:
                return []

        def port():
            for record in records():
                # (the server's own start line, as a plain script's)
                if record["message"].startswith("listening on 127.0.0.1:"):
                    assert record["message"].endswith(" with 2 workers"), record
                    return int(record["message"].split()[2].rsplit(":", 1)[1])
            return None

        port = wait_for(port, 30, what="the listening line in %s" % log_file)
        workers = wait_for(lambda: len(children_of(proc.pid)) == 2 and children_of(proc.pid), 30,
                           what="2 workers")
        for _ in range(6):
            assert request(("127.0.0.1", port), b"HeLLo\n", timeout=10) == b"hello\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    written = records()
    for record in written:
        assert {"time", "level", "pid", "logger", "message"} <= set(record), record
    by_pid = {}
    for record in written:
        by_pid.setdefault(record["pid"], set()).add(record["logger"])
    assert set(by_pid) == {proc.pid, *workers}, written
    # The server's stdlib logger and Twisted's reactor, from the workers.
    assert {"my-echo-server", "twisted.internet.base"} <= set().union(*(by_pid[w] for w in workers))
