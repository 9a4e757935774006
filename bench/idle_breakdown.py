"""What one idle connection holds in a TCPSpoon: memory per connection by allocation site.

    python bench/idle_breakdown.py [--tree DIR] [--conns 3000] [--handler pingpong|readline]
                                   [--tracemalloc]

A TCPSpoon (spoon from checkout ``--tree``) runs in a child process; this process opens
``--conns`` connections, each sending one line and reading its answer, and keeps them
open, so that every handler waits in ``readline()`` (``pingpong``: ``for line in
self.rfile``, the bench's memory scenario; ``readline``: ``while`` over
``self.rfile.readline()``).  It prints the growth of the child's RSS and PSS per
connection, the Python frames a suspended handler's greenlet holds, and with
``--tracemalloc`` the allocation sites that grew, per connection (tracemalloc slows the
server and adds its own memory, so the PSS figure of that run is not the real one).

Python 3.11 frames live in a per-thread "data stack" that greenlet keeps per greenlet:
each greenlet's first frame allocates a 16 KiB chunk (an ``mmap`` that tracemalloc does
not see), of which the first page is touched.  The rest of PSS that tracemalloc does not
account for is that page.
"""

import argparse
import gc
import os
import signal
import socket
import subprocess
import sys
import time
import tracemalloc

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def child(tree, handler, trace):
    sys.path.insert(0, tree)
    sys.path.insert(0, os.path.join(HERE, "servers"))
    import greenlet
    from handlers import make_handlers
    from spoon.server import Gulp, TCPSpoon

    class ReadlineLoop(Gulp):
        def handle(self):
            while True:
                line = self.rfile.readline()
                if not line:
                    return
                self.wfile.write(line)

    class Server(TCPSpoon):
        handler_klass = ReadlineLoop if handler == "readline" else make_handlers(Gulp)["pingpong"]

    server = Server(("127.0.0.1", 0))
    state = {}

    def mark(*_):
        state["before"] = tracemalloc.take_snapshot() if trace else None

    def report(*_):
        out = sys.stderr
        suspended = [g for g in gc.get_objects()
                     if isinstance(g, greenlet.greenlet) and g.gr_frame is not None]
        frame, total = suspended[-1].gr_frame, 0
        print("frames of one suspended handler (innermost first):", file=out)
        while frame is not None:
            code = frame.f_code
            size = 8 * (code.co_nlocals + len(code.co_cellvars) + len(code.co_freevars)
                        + code.co_stacksize + 9)  # 9: the 3.11 frame's fixed words
            total += size
            print("  %-22s %s:%d  %d B" % (code.co_name, os.path.basename(code.co_filename),
                                           frame.f_lineno, size), file=out)
            frame = frame.f_back
        print("  total %d B in the greenlet's data stack chunk" % total, file=out)
        if state.get("before") is not None:
            n = int(os.environ["IDLE_CONNS"])
            after = tracemalloc.take_snapshot()
            print("allocation sites that grew, bytes per connection:", file=out)
            for stat in after.compare_to(state["before"], "lineno")[:16]:
                if stat.size_diff / n >= 8:
                    frame = stat.traceback[0]
                    print("  %7.0f B  %5.2f blocks  %s:%d" % (
                        stat.size_diff / n, stat.count_diff / n,
                        os.path.relpath(frame.filename, tree) if frame.filename.startswith(tree)
                        else frame.filename, frame.lineno), file=out)
        out.flush()
        os._exit(0)

    # TERM, INT, HUP and USR1/2 are the server's own.
    signal.signal(signal.SIGWINCH, mark)
    signal.signal(signal.SIGPWR, report)
    if trace:
        tracemalloc.start()
    print(server.server_address[1], flush=True)
    server.serve_forever()


def memory(pid):
    with open("/proc/%d/smaps_rollup" % pid) as f:
        return {line.split()[0].rstrip(":"): int(line.split()[1]) for line in f
                if line.split()[0] in ("Rss:", "Pss:")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", default=ROOT)
    p.add_argument("--conns", type=int, default=3000)
    p.add_argument("--handler", choices=["pingpong", "readline"], default="pingpong")
    p.add_argument("--tracemalloc", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    tree = os.path.abspath(args.tree)
    if args.child:
        return child(tree, args.handler, args.tracemalloc)
    argv = [sys.executable, __file__, "--child", "--tree", tree, "--handler", args.handler]
    if args.tracemalloc:
        argv.append("--tracemalloc")
    env = dict(os.environ, IDLE_CONNS=str(args.conns))
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
    clients = []
    try:
        port = int(server.stdout.readline())

        def open_idle(n):
            for _ in range(n):
                c = socket.create_connection(("127.0.0.1", port), timeout=10)
                c.sendall(b"HELLO\n")
                c.recv(64)
                clients.append(c)

        open_idle(50)  # the pool, buffers and code paths are warm
        time.sleep(0.2)
        before = memory(server.pid)
        server.send_signal(signal.SIGWINCH)
        time.sleep(0.2)
        open_idle(args.conns)
        time.sleep(0.3)
        after = memory(server.pid)
        print("%s, %s handler, %d idle connections: RSS %.2f KiB, PSS %.2f KiB per connection%s"
              % (tree, args.handler, args.conns, (after["Rss"] - before["Rss"]) / args.conns,
                 (after["Pss"] - before["Pss"]) / args.conns,
                 " (under tracemalloc)" if args.tracemalloc else ""), flush=True)
        server.send_signal(signal.SIGPWR)
        server.wait(timeout=60)
    finally:
        for c in clients:
            c.close()
        if server.poll() is None:
            server.kill()
            server.wait()


if __name__ == "__main__":
    sys.exit(main())
