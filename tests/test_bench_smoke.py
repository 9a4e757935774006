"""Smoke test of the benchmark's load generator (bench/loadgen.py): it drives a real server
over loopback, checks the replies, and refuses any target that is not loopback.  The
benchmarks themselves run with ``make bench``, not here."""

import json
import os
import subprocess
import sys

from support import ROOT

LOADGEN = os.path.join(ROOT, "bench", "loadgen.py")
TRIVIAL = os.path.join(ROOT, "bench", "servers", "trivial.py")


def loadgen(*args, timeout=30):
    out = subprocess.run([sys.executable, LOADGEN, *args], capture_output=True, text=True,
                         timeout=timeout)
    return out


def test_loadgen_short_pingpong_and_wrong_replies_against_a_real_server(server_process):
    server = server_process(
        """
        import runpy
        sys.argv = ["trivial.py", "60"]
        runpy.run_path(%r, run_name="__main__")
        """ % TRIVIAL
    )
    for mode in ("short", "pingpong"):
        out = loadgen(mode, "--port", str(server.port), "--conc", "4", "--procs", "2",
                      "--warmup", "0.05", "--duration", "0.3", "--measure-pid", str(server.pid))
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        assert report["requests"] > 20, report
        assert report["errors"] == 0 and report["bad"] == 0, report
        assert report["workers_reported"] == 2
        assert report["p50_ms"] <= report["p99_ms"] <= report["max_ms"]
        assert report["server_cpu_s"] >= 0
    assert report["served_fraction"] == 1.0
    # Replies are checked: expecting something else counts every one as bad.
    out = loadgen("short", "--port", str(server.port), "--conc", "2", "--warmup", "0",
                  "--duration", "0.2", "--expect", "something else\n")
    report = json.loads(out.stdout)
    assert report["requests"] > 0 and report["bad"] == report["requests"]


def test_loadgen_refuses_targets_that_are_not_loopback():
    out = loadgen("short", "--host", "192.0.2.1", "--port", "9", "--duration", "0.1")
    assert out.returncode != 0
    assert "only loopback" in out.stderr
