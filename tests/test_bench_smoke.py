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


def bench_module(name):
    """A module of bench/ (they import each other by plain name)."""
    import importlib

    bench = os.path.join(ROOT, "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    return importlib.import_module(name)


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


def test_shape_repetitions_are_summarised_as_median_min_and_max():
    shapes = bench_module("shapes")
    assert shapes.summary([40.0, 30.0, None, 35.0]) == {
        "runs": [40.0, 30.0, 35.0], "median": 35.0, "min": 30.0, "max": 40.0}
    assert shapes.summary([None])["median"] is None


def test_each_load_shape_gets_a_tcpspork_vs_original_row_read_with_its_spread():
    report = bench_module("report")

    def cell(*runs):
        return {"cpu_us": {"runs": list(runs), "median": sorted(runs)[1], "min": min(runs),
                           "max": max(runs)}}

    results = {"shapes": {
        "pinned": {"reps": 3, "concs": [8], "load": {"min": 1.0, "max": 2.0}, "peers": {
            "spork": {8: cell(20.0, 22.0, 24.0)}, "spoon-1.0.6": {8: cell(23.0, 24.0, 25.0)},
            "spork-csf": {8: cell(18.0, 18.0, 19.0)}}},
        "unpinned": {"reps": 3, "concs": [16, 64], "load": {"min": 1.0, "max": 2.0}, "peers": {
            "spork": {"16": cell(33.0, 36.0, 35.0)}, "spoon-1.0.6": {"16": cell(24.0, 24.5, 26.0)}}},
    }}
    rows = {r[0]: r for r in report.shape_targets(results)}
    pinned = rows["CPU/request, TCPSpork vs spoon 1.0.6, pinned c=8, median of 3"]
    assert pinned[2].startswith("0.92x (22.0 vs 24.0 µs; spread 0.80-1.04x)")
    assert pinned[3] == "met" and "within the spread" in pinned[4]
    unpinned = rows["CPU/request, TCPSpork vs spoon 1.0.6, unpinned c=16, median of 3"]
    assert unpinned[2].startswith("1.43x") and unpinned[3] == "not met"
    assert "within the spread" not in unpinned[4]
    # The client_speaks_first opt-in gets a row of its own, only where it ran.
    opt_in = rows["CPU/request, TCPSpork with client_speaks_first vs spoon 1.0.6, pinned c=8, "
                  "median of 3"]
    assert opt_in[2].startswith("0.75x") and opt_in[3] == "met"
    assert "client speaks first" in opt_in[4]
    assert len(rows) == 3
    del results["shapes"]["pinned"]["peers"]["spoon-1.0.6"]
    rows = {r[0]: r for r in report.shape_targets(results)}
    assert rows["CPU/request, TCPSpork vs spoon 1.0.6, pinned c=8, median of 3"][3] == "pending"


def test_pingpong_against_the_original_is_met_only_with_every_client_served():
    report = bench_module("report")

    def peer(rps, served):
        return {"status": "ok", "pingpong": {16: {"rps": rps, "served_fraction": served}}}

    results = {"peers": {"spork": peer(30000.0, 1.0), "spoon-1.0.6": peer(10000.0, 0.125)}}
    row = report.pingpong_row(results, 16, "spork", "")
    assert row[2] == "3.00x (30000 vs 10000 req/s), ours served 100%" and row[3] == "met"
    results["peers"]["spork"] = peer(30000.0, 0.5)
    assert report.pingpong_row(results, 16, "spork", "")[3] == "not met"
    results["peers"]["spork"] = peer(15000.0, 1.0)
    assert report.pingpong_row(results, 16, "spork", "")[3] == "not met"
