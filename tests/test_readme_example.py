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
