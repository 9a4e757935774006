"""One log stream: server records and Twisted's events in the same place, pid on each line.

Spoon servers log through ``logging.getLogger(server_logger)`` (the original's contract),
while Twisted emits its own events.  Outside ``twistd`` nobody starts Twisted's logging, and
Twisted would buffer its events in memory; forwarding them to ``logging`` puts both in the
same place, with whatever handlers the program configured.

:func:`setup_logging` is the one place that configures those handlers for the
``spoon.daemon`` command line, foreground runs and the pre-fork supervisor.  Handlers go on
the root logger so that ``server_logger``, ``twisted`` and the application's own loggers all
land in one file.  Every line carries ``[pid]``: a pre-forked pool has one master and many
workers writing to the same file, and the pid says which one.

Log files are :class:`logging.handlers.WatchedFileHandler`: when logrotate moves the file
away and creates a new one, the next record notices the changed inode and reopens the path,
in every process (each forked worker checks for itself), so no ``copytruncate`` and no signal
is needed.  Files are opened in append mode, so writes from several processes never
overwrite each other.
"""

import logging
import logging.handlers
import sys

__all__ = [
    "LOG_FORMAT",
    "bridge_twisted_to_stdlib",
    "setup_logging",
    "setup_sentry",
    "sentry_available",
    "SentryMissing",
]

#: The format of every line spoon writes: time, pid, logger name, level, message.
LOG_FORMAT = "%(asctime)s [%(process)d] %(name)s %(levelname)s: %(message)s"

# Marks the handlers setup_logging() installed, so that calling it again replaces them
# instead of doubling every line.
_OURS = "_spoon_handler"

_bridged = False


class SentryMissing(RuntimeError):
    """A Sentry DSN was given but the optional ``sentry-sdk`` package is not installed."""

    def __init__(self):
        super().__init__(
            "a Sentry DSN was given but sentry-sdk is not installed: "
            "pip install 'spoon[sentry]' (or pip install sentry-sdk)"
        )


def bridge_twisted_to_stdlib():
    """Send Twisted's global log events to the stdlib logger named "twisted" (once)."""
    global _bridged
    if _bridged:
        return
    _bridged = True
    from twisted.logger import STDLibLogObserver, globalLogBeginner

    globalLogBeginner.beginLoggingTo(
        [STDLibLogObserver(name="twisted")], redirectStandardIO=False
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
):
    """Send every record (``server_logger``, Twisted's events, the application's loggers)
    to one place, in :data:`LOG_FORMAT`.

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
    formatter = logging.Formatter(LOG_FORMAT)
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


def remove_handler(handler, logger_name=""):
    """Take one handler returned by :func:`setup_logging` off again (e.g. the terminal's
    stream once a daemon has detached from it)."""
    logger = logging.getLogger(logger_name)
    logger.removeHandler(handler)
    handler.close()
    remaining = [h.level for h in logger.handlers]
    if remaining:
        logger.setLevel(min(remaining))
