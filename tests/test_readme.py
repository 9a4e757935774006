"""The Python examples of README.rst run as written (give or take the port)."""

import os
import re
import signal

from support import ROOT, connect, recv_all, request, wait_for


def python_blocks():
    with open(os.path.join(ROOT, "README.rst")) as f:
        text = f.read()
    blocks = []
    for match in re.finditer(r"\.\. code-block:: python\n\n((?:    .*\n|\n)+)", text):
        lines = [line[4:] for line in match.group(1).splitlines()]
        blocks.append("\n".join(lines).strip() + "\n")
    return blocks


def block_containing(needle):
    [block] = [b for b in python_blocks() if needle in b]
    return block


def test_readme_has_the_examples_this_test_runs():
    assert len(python_blocks()) >= 4


def test_first_example_serves_as_written(server_process):
    source = block_containing("MyEchoServerForked(")
    source = source.replace('("::0", 30111)', '("::0", 0)')
    source = source.replace(
        "server.serve_forever()",
        'print("READY", server.server_address[1], flush=True)\nserver.serve_forever()',
    )
    server = server_process(source)
    for _ in range(12):  # enough requests to meet more than one worker
        assert request(("127.0.0.1", server.port), b"Test") == b"test"
    server.signal(signal.SIGTERM)
    assert server.wait(timeout=40) == 0


def test_handler_examples_behave_as_described(server_process):
    source = "import spoon.server\n" + block_containing("class PingPong") + block_containing(
        "class Lookup"
    ) + """
class Server(spoon.server.TCPSpoon):
    handler_klass = {handler}

server = Server(("127.0.0.1", 0))
print("READY", server.server_address[1], flush=True)
server.serve_forever()
"""
    ping = server_process(source.format(handler="PingPong"))
    with connect(("127.0.0.1", ping.port)) as c:
        for i in range(3):
            c.sendall(b"ping %d\n" % i)
            assert c.recv(100) == b"pong ping %d\n" % i

    greeter = server_process(source.format(handler="Greeter"))
    with connect(("127.0.0.1", greeter.port)) as c:
        assert c.recv(100) == b"220 ready\r\n"
        c.sendall(b"bob\r\n")
        assert recv_all(c) == b"250 hello bob\r\n"

    lookup = server_process(source.format(handler="Lookup"))
    assert request(("127.0.0.1", lookup.port), b"key\n") == b"KEY\n"


def test_twisted_program_example(server_process):
    source = block_containing("serverFromString")
    source = source.replace('"tcp:30111:interface=127.0.0.1"', '"tcp:0:interface=127.0.0.1"')
    source = source.replace(
        "reactor.run()",
        "d.addCallback(lambda port: print('READY', port.getHost().port, flush=True))\n"
        "reactor.run()",
    )
    source = source.replace("serverFromString(reactor", "d = serverFromString(reactor", 1)
    source = source.replace("MyEchoServer(", "sample_servers.EchoServer(")
    server = server_process("import sample_servers\n" + source)
    wait_for(lambda: request(("127.0.0.1", server.port), b"TWISTED\n") == b"twisted\n",
             timeout=10, what="the Twisted program to answer")
