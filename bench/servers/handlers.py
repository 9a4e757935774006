"""The benchmark's handler logic in socketserver style, shared by every peer whose
handlers follow that contract (ours, the original spoon, stdlib socketserver).

Each peer gets the same code on its own base class, so the differences measured are the
servers', not the handlers'.  Imports nothing but the standard library: it runs in the
peers' own virtual environments too.
"""

import os
import time

#: CPU seconds the "cpu" handler burns per request.
CPU_BURN = 0.020
CHUNK = 65536


def burn(seconds=CPU_BURN):
    """Use ``seconds`` of this thread's CPU time (not wall time: a preempted handler still
    does the same work)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def big_transfer(rfile, write):
    """``BIG in out``: read ``in`` bytes of body from ``rfile``, then ``write`` ``out`` bytes
    (the large-transfer scenario; shared by the socketserver-style and gevent handlers)."""
    words = rfile.readline().split()
    left = int(words[1])
    while left > 0:
        chunk = rfile.read(min(left, CHUNK))
        if not chunk:
            return
        left -= len(chunk)
    block = b"y" * CHUNK
    left = int(words[2])
    while left > 0:
        n = min(left, CHUNK)
        write(block if n == CHUNK else block[:n])
        left -= n


def make_handlers(base):
    """Handler classes on ``base`` (a StreamRequestHandler-like class), by name."""

    class Echo(base):
        """The README's handler: read one line, send it back lower-cased."""

        def handle(self):
            request = self.rfile.readline().decode("utf8")
            response = request.lower().encode("utf8")
            self.wfile.write(response)

    class PingPong(base):
        """Persistent connection: answer every line lower-cased until EOF."""

        def handle(self):
            for line in self.rfile:
                self.wfile.write(line.decode("utf8").lower().encode("utf8"))

    class Cpu(base):
        """CPU-bound request: burn 20 ms, reply with this worker's pid."""

        def handle(self):
            self.rfile.readline()
            burn()
            self.wfile.write(b"%d\n" % os.getpid())

    class Big(base):
        """``BIG in out``: read ``in`` bytes of body, reply with ``out`` bytes."""

        def handle(self):
            big_transfer(self.rfile, self.wfile.write)

    return {"echo": Echo, "pingpong": PingPong, "cpu": Cpu, "big": Big}


def ready(port):
    """Tell the bench runner we listen (it reads this line from our log)."""
    print("READY %d" % port, flush=True)
