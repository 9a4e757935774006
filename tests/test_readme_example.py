"""The original README's example, byte for byte, against a real server process."""

import signal

from support import request

ECHO = """
    import spoon.server

    class RequestHandler(spoon.server.Gulp):
        def handle(self):
            request = self.rfile.readline().decode("utf8")
            response = request.lower().encode("utf8")
            self.wfile.write(response)

    class MyEchoServer(spoon.server.TCPSpoon):
        server_logger = "my-echo-server"
        handler_klass = RequestHandler

    server = MyEchoServer(("::0", 0))
    print("READY", server.server_address[1], flush=True)
    server.serve_forever()
    print("RETURNED", flush=True)
"""


def test_readme_example_half_close(server_process):
    server = server_process(ECHO)
    assert request(("127.0.0.1", server.port), b"Test") == b"test"
    # "::0" is dual-stack: the same server answers on IPv6 loopback.
    assert request(("::1", server.port), b"MiXeD\n") == b"mixed\n"
    server.signal(signal.SIGTERM)
    assert server.wait(timeout=10) == 0
    assert "RETURNED" in server.read_output()


def test_readme_example_logs_its_start_to_stderr_as_twistd_does(server_process):
    """The plain script configures no logging: spoon's default says where it listens, in
    spoon's line format, as twistd would (stderr is merged into the output here)."""
    from support import LOG_LINE, wait_for

    server = server_process(ECHO)

    def started():
        for line in server.lines_so_far():
            match = LOG_LINE.match(line)
            if match and match.group(5) == "listening on [::]:%d" % server.port:
                return match
        return None

    match = wait_for(started, timeout=10, what="the start line")
    assert (match.group(2), int(match.group(3)), match.group(4)) == ("INFO", server.pid, "my-echo-server")
    server.signal(signal.SIGTERM)
    assert server.wait(timeout=10) == 0
