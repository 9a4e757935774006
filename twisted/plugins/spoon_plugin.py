"""The ``twistd spoon`` plugin: a pointer to :mod:`spoon.tap`, where the logic lives."""
from twisted.application.service import ServiceMaker

spoon = ServiceMaker("spoon", "spoon.tap", "Run a spoon (pre-forking) server.", "spoon")
