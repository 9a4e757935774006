"""One log format in every mode, for stdlib ``logging`` records and Twisted events alike.

Spoon servers log through ``logging.getLogger(server_logger)`` (the original's contract),
Twisted emits its own events, and a pool has one supervisor and many workers writing to the
same place.  Every line says when, how bad, which process, which logger, what::

    2026-11-28T07:00:19.123+00:00 INFO [4242] my-echo-server: listening on tcp [::]:30111

that is ``TIME LEVEL [PID] LOGGER: MESSAGE``: ``TIME`` is ISO 8601 local time with
milliseconds and the UTC offset, ``LEVEL`` one of DEBUG, INFO, WARNING, ERROR, CRITICAL
(Twisted's ``warn`` is WARNING), ``LOGGER`` the stdlib logger's name or the Twisted event's
namespace.  The lines that continue a record (a traceback, a multi-line message) start with a
tab, so every line either matches :data:`LINE` or continues the one above.  With the ``json``
format each record is one JSON object on one line, for log shippers: ``time``, ``level``,
``pid``, ``logger``, ``message`` and, when there is one, ``traceback``.

:func:`configure` is the one function an entry point calls (the ``spoon`` command, the
pool's supervisor, the examples): it takes the :class:`spoon.config.Config`.  Under
``twistd`` the Twisted log is the hub instead: :func:`twistd_observer` is the observer
``twistd spoon`` gives twistd, and :func:`forward_stdlib_to_twisted` sends stdlib records
there.  :func:`ensure_default_logging` is for a server run as a plain script: its start is
logged to stderr, as twistd would, unless the program configured logging itself.

Log files are :class:`logging.handlers.WatchedFileHandler`: when logrotate moves the file
away, the next record reopens the path, in every process (each forked worker checks for
itself), so no ``copytruncate`` and no signal is needed.  Files are opened in append mode,
so writes from several processes never overwrite each other.
"""

import datetime
import json
import logging
import logging.handlers
import os
import re
import sys

from zope.interface import implementer

__all__ = [
    "LINE",
    "LEVEL_NAMES",
    "configure",
    "ensure_default_logging",
    "setup_logging",
    "remove_handler",
    "bridge_twisted_to_stdlib",
    "forward_stdlib_to_twisted",
    "twistd_observer",
    "parse_line",
    "relayed_event",
    "twisted_level",
    "render",
    "SpoonFormatter",
    "setup_sentry",
    "sentry_available",
    "SentryMissing",
]

#: The level names of a line, lowest first.
LEVEL_NAMES = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

#: One header line of the text format: groups time, level, pid, logger, message.
LINE = re.compile(
    r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d) "
    r"(DEBUG|INFO|WARNING|ERROR|CRITICAL) \[(\d+)\] (\S+): (.*)$"
)

#: Event keys with which a Twisted event names the process and time of a record written
#: elsewhere (a stdlib record, or a line relayed from a pool's supervisor or worker).
PID_KEY = "spoon_pid"
TIME_KEY = "spoon_time"
TRACEBACK_KEY = "spoon_traceback"
_FROM_STDLIB = "spoon_from_stdlib"
_FROM_TWISTED = "spoon_from_twisted"

# Marks the handlers spoon installed, so that configuring again replaces them instead of
# doubling every line.
_OURS = "_spoon_handler"


# -- the format ------------------------------------------------------------------------------


def format_time(seconds):
    """ISO 8601 local time with milliseconds and UTC offset: 2026-11-28T07:00:19.123+00:00."""
    moment = datetime.datetime.fromtimestamp(seconds).astimezone()
    return moment.isoformat(timespec="milliseconds")


_SPACE = re.compile(r"\s")


def render(time, level, pid, logger, message, traceback=None, log_format="text"):
    """The text of one record (no final newline) in ``log_format`` ("text" or "json")."""
    if log_format == "json":
        fields = {
            "time": format_time(time),
            "level": level,
            "pid": pid,
            "logger": logger,
            "message": message,
        }
        if traceback:
            fields["traceback"] = traceback
        return json.dumps(fields, ensure_ascii=False)
    text = message if not traceback else "%s\n%s" % (message, traceback)
    # Any line boundary a reader may split on (str.splitlines') starts a tab-led line.
    text = "\n\t".join(text.splitlines())
    logger = _SPACE.sub("_", logger) if logger else "-"
    return "%s %s [%d] %s: %s" % (format_time(time), level, pid, logger, text)


def parse_line(text):
    """The fields of one line a spoon process wrote (text header or JSON object): a dict
    with time (str), level, pid (int), logger, message and traceback (or None); None for a
    line of neither shape (a continuation line, or some program's stray output).

    For the pool's log relay: a supervisor's output, re-emitted with :func:`relayed_event`
    in the host's log with the writer's pid.
    """
    text = text.rstrip("\r\n")
    if text.startswith("{"):
        try:
            fields = json.loads(text)
        except ValueError:
            return None
        if not isinstance(fields, dict) or not {"level", "pid", "logger", "message"} <= set(fields):
            return None
        fields.setdefault("traceback", None)
        return fields
    match = LINE.match(text)
    if match is None:
        return None
    time, level, pid, logger, message = match.groups()
    return {"time": time, "level": level, "pid": int(pid), "logger": logger,
            "message": message, "traceback": None}


def relayed_event(fields):
    """Keyword arguments for ``Logger(namespace=fields["logger"]).emit(
    twisted_level(fields["level"]), **relayed_event(fields))`` (``twisted.logger.Logger``)
    that show a relayed record (from :func:`parse_line`) with its writer's pid and time."""
    pid = int(fields["pid"])
    event = {"format": "{spoon_text}", "spoon_text": fields["message"],
             PID_KEY: pid, TRACEBACK_KEY: fields.get("traceback"),
             # What Twisted's own observers show (the embedding program's, say): the
             # writer's pid beside the logger and level.
             "log_system": "%s#%s pid=%d" % (
                 fields["logger"], twisted_level(fields["level"]).name, pid)}
    try:
        event[TIME_KEY] = datetime.datetime.fromisoformat(fields["time"]).timestamp()
    except (KeyError, TypeError, ValueError):
        pass  # the relay's own time, then
    return event


def twisted_level(name):
    """The Twisted ``LogLevel`` of a line's level name ("WARNING" is ``LogLevel.warn``)."""
    for level, level_text in _twisted_levels().items():
        if level_text == name:
            return level
    raise ValueError("unknown level name %r" % (name,))


def _twisted_levels():
    from twisted.logger import LogLevel

    return {
        LogLevel.debug: "DEBUG",
        LogLevel.info: "INFO",
        LogLevel.warn: "WARNING",
        LogLevel.error: "ERROR",
        LogLevel.critical: "CRITICAL",
    }


def level_name(levelno):
    """The line's level name for a stdlib level number (a custom level: the one below)."""
    for name in reversed(LEVEL_NAMES):
        if levelno >= getattr(logging, name):
            return name
    return "DEBUG"


def _event_fields(event):
    """(time, level, pid, logger, message, traceback) of a Twisted event."""
    from twisted.logger import formatEvent

    level = _twisted_levels().get(event.get("log_level"), "INFO")
    namespace = event.get("log_namespace")
    if namespace in (None, "log_legacy"):
        system = event.get("log_system")
        namespace = system if system not in (None, "-") else "twisted"
    traceback = event.get(TRACEBACK_KEY)
    failure = event.get("log_failure")
    if failure is not None and not traceback:
        try:
            traceback = failure.getTraceback().rstrip("\n")
        except Exception:
            traceback = repr(failure)
    return (
        event.get(TIME_KEY) or event.get("log_time") or 0.0,
        level,
        event.get(PID_KEY) or os.getpid(),
        namespace,
        formatEvent(event),
        traceback,
    )


class SpoonFormatter(logging.Formatter):
    """A stdlib formatter writing spoon's line (``log_format`` "text" or "json")."""

    def __init__(self, log_format="text"):
        super().__init__()
        self.log_format = log_format

    def format(self, record):
        message = record.getMessage()
        traceback = getattr(record, TRACEBACK_KEY, None)
        if record.exc_info and not traceback:
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
            traceback = record.exc_text
        if record.stack_info and not traceback:
            traceback = self.formatStack(record.stack_info)
        return render(
            record.created,
            level_name(record.levelno),
            getattr(record, PID_KEY, None) or record.process,
            record.name,
            message,
            traceback,
            self.log_format,
        )


# -- Twisted events into stdlib logging (every mode but twistd) -----------------------------


class _TwistedToStdlib:
    """A Twisted log observer that hands each event to the stdlib logger of its namespace."""

    def __call__(self, event):
        if event.get(_FROM_STDLIB):
            return
        time, level, pid, name, message, traceback = _event_fields(event)
        logger = logging.getLogger(name)
        levelno = getattr(logging, level)
        if not logger.isEnabledFor(levelno):
            return
        record = logger.makeRecord(
            name, levelno, "(twisted)", 0, "%s", (message,), None,
            extra={PID_KEY: pid, TRACEBACK_KEY: traceback, _FROM_TWISTED: True},
        )
        record.created = time
        record.msecs = (time - int(time)) * 1000
        logger.handle(record)


_bridged = False


def bridge_twisted_to_stdlib():
    """Send Twisted's global log events to stdlib logging (once per process), each to the
    logger named by the event's namespace; events before this call are not lost (Twisted
    buffers them until its log begins)."""
    global _bridged
    if _bridged:
        return
    _bridged = True
    from twisted.logger import globalLogBeginner

    globalLogBeginner.beginLoggingTo([_TwistedToStdlib()], redirectStandardIO=False)


# -- stdlib records into the Twisted log (twistd) -------------------------------------------


class _StdlibToTwisted(logging.Handler):
    """Forward stdlib records to Twisted's log, with their own time, pid and traceback, so
    that they land in twistd's log next to Twisted's events, in the same format."""

    def emit(self, record):
        if getattr(record, _FROM_TWISTED, False):
            return
        from twisted.logger import globalLogPublisher

        try:
            message = record.getMessage()
            traceback = None
            if record.exc_info:
                traceback = logging.Formatter().formatException(record.exc_info)
        except Exception:
            self.handleError(record)
            return
        globalLogPublisher({
            "log_format": "{spoon_text}",
            "spoon_text": message,
            "log_level": twisted_level(level_name(record.levelno)),
            "log_namespace": record.name,
            "log_time": record.created,
            PID_KEY: record.process,
            TRACEBACK_KEY: traceback,
            _FROM_STDLIB: True,
        })


def forward_stdlib_to_twisted(level=logging.INFO):
    """Put one handler on the root logger that sends stdlib records of ``level`` and above
    to Twisted's log (replacing spoon's earlier handlers).  For processes where Twisted's
    log is the hub: twistd."""
    root = logging.getLogger()
    _remove_our_handlers(root)
    handler = _StdlibToTwisted(level)
    setattr(handler, _OURS, True)
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def _observer_class():
    from twisted.logger import ILogObserver

    @implementer(ILogObserver)
    class LineObserver:
        """A Twisted log observer writing spoon's lines to a file object (twistd's log)."""

        def __init__(self, out, log_format="text", level=logging.INFO):
            self.out = out
            self.log_format = log_format
            self.level = level

        def __call__(self, event):
            time, level, pid, name, message, traceback = _event_fields(event)
            if getattr(logging, level) < self.level:
                return
            if not message and not traceback:
                return
            self.out.write(render(time, level, pid, name, message, traceback, self.log_format) + "\n")
            self.out.flush()

    return LineObserver


def twistd_observer(twistd_options, log_format="text", level=logging.INFO):
    """The log observer ``twistd spoon`` sets as its application's ``ILogObserver``:
    where twistd itself would write (``--logfile``, ``twistd.log`` for a daemon, stdout with
    ``-n`` and no ``--logfile``), in spoon's format.  Returns ``(observer, log_file)`` where
    ``log_file`` is the ``twisted.python.logfile.LogFile`` (None for stdout) whose
    ``rotate()`` SIGUSR1 must call, as twistd's own observer would have.

    Returns ``(None, None)`` where twistd's own choice must stand: ``--syslog``.
    """
    from twisted.python import logfile

    if twistd_options.get("syslog"):
        return None, None
    path = twistd_options.get("logfile") or ""
    nodaemon = twistd_options.get("nodaemon")
    if path == "-" or (nodaemon and not path):
        if not nodaemon:
            sys.exit("Daemons cannot log to stdout, exiting!")
        return _observer_class()(sys.stdout, log_format, level), None
    log_file = logfile.LogFile.fromFullPath(path or "twistd.log")
    return _observer_class()(log_file, log_format, level), log_file


# -- stdlib handlers ----------------------------------------------------------------------


class SentryMissing(RuntimeError):
    """A Sentry DSN was given but the optional ``sentry-sdk`` package is not installed."""

    def __init__(self):
        super().__init__(
            "a Sentry DSN was given but sentry-sdk is not installed: "
            "pip install 'spoon[sentry]' (or pip install sentry-sdk)"
        )


def sentry_available():
    """True when the optional ``sentry-sdk`` package can be imported."""
    try:
        import sentry_sdk  # noqa: F401
    except ImportError:
        return False
    return True


def setup_sentry(dsn, event_level=logging.WARNING, breadcrumb_level=logging.INFO):
    """Report log records of ``event_level`` and above to Sentry at ``dsn``.

    Raises :class:`SentryMissing` when ``sentry-sdk`` is not installed, so that asking for
    Sentry never silently reports nothing.  Call it in the process that will log (after
    daemonising): the SDK sends from a background thread.
    """
    try:
        import sentry_sdk
        from sentry_sdk.integrations.logging import LoggingIntegration
    except ImportError:
        raise SentryMissing() from None
    sentry_sdk.init(
        dsn=dsn,
        integrations=[LoggingIntegration(level=breadcrumb_level, event_level=event_level)],
    )


def _remove_our_handlers(logger):
    for handler in list(logger.handlers):
        if getattr(handler, _OURS, False):
            logger.removeHandler(handler)
            handler.close()


def setup_logging(
    level=logging.INFO,
    log_file=None,
    stream=None,
    sentry_dsn=None,
    stream_level=None,
    logger_name="",
    log_format="text",
):
    """Send every record (``server_logger``, Twisted's events, the application's loggers)
    to one place, in spoon's format (``log_format`` "text" or "json").

    ``log_file``: a path, appended to and reopened when logrotate moves it away.
    ``stream``: a file object (e.g. ``sys.stderr``); when neither is given, ``sys.stderr``.
    ``level`` applies to the file; ``stream_level`` (default ``level``) to the stream.
    ``sentry_dsn``: also report warnings and errors to Sentry (needs ``sentry-sdk``).
    ``logger_name``: the logger the handlers go on, the root logger by default.

    Calling it again replaces the handlers it installed before.  Returns the list of
    handlers installed.  Fails (``OSError``) at once when the log file cannot be opened.
    """
    if sentry_dsn and not sentry_available():
        raise SentryMissing()
    logger = logging.getLogger(logger_name)
    formatter = SpoonFormatter(log_format)
    handlers = []
    if log_file:
        file_handler = logging.handlers.WatchedFileHandler(log_file, mode="a", encoding="utf-8")
        file_handler.setLevel(level)
        handlers.append(file_handler)
    if stream is not None or not log_file:
        stream_handler = logging.StreamHandler(sys.stderr if stream is None else stream)
        stream_handler.setLevel(level if stream_level is None else stream_level)
        handlers.append(stream_handler)
    _remove_our_handlers(logger)
    for handler in handlers:
        setattr(handler, _OURS, True)
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    logger.setLevel(min(handler.level for handler in handlers))
    bridge_twisted_to_stdlib()
    if sentry_dsn:
        setup_sentry(sentry_dsn)
    return handlers


def configure(config, stream=None, stream_level=None, sentry=True):
    """Set up this process's logging from a :class:`spoon.config.Config`: its
    ``log_level``, ``log_format``, ``log_file`` (watched for logrotate; stderr when there is
    none) and ``sentry_dsn``.  The one call of every entry point outside twistd.

    ``stream`` (e.g. ``sys.stderr``) is written to as well as the log file, at
    ``stream_level`` (default: the configured level): the ``spoon`` command keeps the
    terminal informed until it detaches.  ``sentry=False`` leaves Sentry to a later
    :func:`setup_sentry` (its SDK sends from a thread, which a daemon's fork would not
    keep).  Returns the handlers installed (as
    :func:`setup_logging`), which :func:`remove_handler` takes off again.
    """
    return setup_logging(
        level=level_number(config.log_level),
        log_file=config.log_file,
        stream=stream,
        sentry_dsn=getattr(config, "sentry_dsn", None) if sentry else None,
        stream_level=stream_level,
        log_format=config.log_format,
    )


def level_number(name):
    """The stdlib level number of a level name ("info", "WARNING"...)."""
    return getattr(logging, str(name).upper())


def ensure_default_logging(logger_name="", config=None):
    """Make a server run as a plain script (``MyServer(addr).serve_forever()`` and nothing
    else) log its start and its errors, as twistd would, in spoon's format: to stderr at
    INFO, or as ``config`` says (a :class:`spoon.config.Config`, e.g. the "script" entry
    point's, where ``SPOON_LOG_FORMAT``, ``SPOON_LOG_LEVEL`` and ``SPOON_LOG_FILE`` apply).

    Does nothing when records of ``logger_name`` already reach a handler (the program, an
    entry point or a test framework configured logging).  Returns True when it set up the
    default.
    """
    if logging.getLogger(logger_name).hasHandlers():
        return False
    if config is not None:
        configure(config)
        for error in config.errors:
            # A bad SPOON_* value: the default stands in, and the log says so.
            logging.getLogger(logger_name).warning("configuration ignored: %s", error)
    else:
        setup_logging(level=logging.INFO)
    return True


def remove_handler(handler, logger_name=""):
    """Take one handler returned by :func:`setup_logging` off again (e.g. the terminal's
    stream once a daemon has detached from it)."""
    logger = logging.getLogger(logger_name)
    logger.removeHandler(handler)
    handler.close()
    remaining = [h.level for h in logger.handlers]
    if remaining:
        logger.setLevel(min(remaining))
