"""Servers and factories that the service and twistd tests run in real processes (twistd,
the supervisor, the workers import this module by its dotted path ``test_service_apps``).

Importing it has no side effect: it holds no tests.

Every stream handler answers one line with "<pid> <config generation> <uid>\\n"; a request
"sleep S" first answers "started\n", then waits S seconds (without blocking the worker); a
request "reactor" answers "<pid> <class name of the worker's reactor>\n".
"""

import os

from twisted.internet import task

import spoon.server


class Report(spoon.server.Gulp):
    def handle(self):
        line = self.rfile.readline().strip()
        if line.startswith(b"sleep "):
            from twisted.internet import reactor

            self.wfile.write(b"started\n")
            self.wait(task.deferLater(reactor, float(line.split()[1]), lambda: None))
        if line == b"reactor":
            from twisted.internet import reactor

            self.wfile.write(b"%d %s\n" % (os.getpid(), type(reactor).__name__.encode()))
            return
        if line == b"log":
            self.server.log.info("request logged by the handler")
        self.wfile.write(b"%d %d %d\n" % (os.getpid(), self.server.generation, os.getuid()))


class _Generations:
    server_logger = "gen-server"
    handler_klass = Report
    graceful_timeout = 10
    generation = 0

    def load_config(self):
        self.generation += 1
        self.log.info("config generation %d", self.generation)


class GenerationSpork(_Generations, spoon.server.TCPSpork):
    prefork = 2


class GenerationSpoon(_Generations, spoon.server.TCPSpoon):
    pass


class UDPReport(spoon.server.UDPGulp):
    def handle(self):
        self.wfile.write(b"%d %d\n" % (os.getpid(), self.server.generation))


class UDPGenerationSpork(_Generations, spoon.server.UDPSpork):
    handler_klass = UDPReport
    prefork = 2


class NotAServer:
    pass


def make_site():
    """A plain Twisted factory: a twisted.web Site whose every page is the worker's pid."""
    from twisted.web import resource, server

    class Pid(resource.Resource):
        isLeaf = True

        def render_GET(self, request):
            return b"%d" % os.getpid()

    return server.Site(Pid())
