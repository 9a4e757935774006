"""spoon.linux: what the pool asks of the kernel directly."""

import subprocess
import sys

from support import ROOT

NO_SUBPROCESS = """
import subprocess, sys
sys.path.insert(0, %r)

def refuse(*args, **kwargs):
    raise AssertionError("a subprocess was started: %%r" %% (args,))

subprocess.Popen = refuse
from spoon import linux
assert linux.set_parent_death_signal(0) is not False
print("ok")
"""


def test_setting_the_parent_death_signal_starts_no_process():
    """Every new worker sets it: finding the C library must not run ldconfig (a fork and
    an exec per worker, which also showed up as a third "worker" in the benchmarks)."""
    result = subprocess.run([sys.executable, "-c", NO_SUBPROCESS % ROOT], capture_output=True,
                            text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
