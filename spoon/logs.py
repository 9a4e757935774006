"""One log stream: Twisted's log events forwarded to the standard library's ``logging``.

Spoon servers log through ``logging.getLogger(server_logger)`` (the original's contract),
while Twisted emits its own events.  Outside ``twistd`` nobody starts Twisted's logging, and
Twisted would buffer its events in memory; forwarding them to ``logging`` puts both in the
same place, with whatever handlers the program configured.
"""

_bridged = False


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
