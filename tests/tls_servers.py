"""The server ``tests/test_tls.py`` runs under twistd (imported by its dotted path
``tls_servers``); importing it has no side effect.

Every request answers "<pid> <peer>\\n": <peer> is the commonName of the client
certificate ``self.request.getpeercert()`` shows, or "none".
"""

import os

import spoon.server


class PeerReport(spoon.server.Gulp):
    def handle(self):
        self.rfile.readline()
        cert = self.request.getpeercert()
        peer = b"none"
        if cert is not None:
            peer = dict(rdn[0] for rdn in cert["subject"])["commonName"].encode()
        self.wfile.write(b"%d %s\n" % (os.getpid(), peer))


class PeerSpork(spoon.server.TCPSpork):
    handler_klass = PeerReport
    prefork = 2
