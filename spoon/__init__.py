"""spoon: pre-forking socketserver-style servers on Twisted.

``spoon.server`` holds the original API (Gulp handlers, Spoon and Spork servers),
``spoon.daemon`` the daemon tools, ``twistd spoon`` the Twisted way to run one.
"""

__version__ = "2.0.0.dev0"
