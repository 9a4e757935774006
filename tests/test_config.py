"""spoon.config: one option table, four sources in a fixed order, every error at once.

Unit tests call :func:`spoon.config.build` with explicit command-line values and an explicit
environment; the files are real TOML files in a temporary directory.  The command lines
generated from the table are tested through ``argparse``/``usage.Options`` here and through
real processes (``python -m spoon.examples``, ``twistd spoon``) in this module and in
``test_twistd``.
"""

import argparse
import io
import os
import subprocess
import sys
import tempfile

import pytest
from hypothesis import given, settings, strategies as st

import config_servers
from spoon import __version__, config
from support import ROOT

SPORK = "config_servers.DefaultsSpork"


def toml(tmp_path, text, name="spoon.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def build(options=None, environ=None, entry_point="twistd", **kwargs):
    return config.build(entry_point, options, environ=environ or {}, **kwargs)


# -- precedence -------------------------------------------------------------------------------


def test_class_attributes_and_command_line_defaults_are_the_lowest_source():
    c = build({"server": SPORK})
    assert c.errors == []
    assert (c.port, c.interface, c.workers, c.graceful_timeout, c.worker_timeout) == (
        4321, "127.0.0.1", 3, 7.0, 11.0)
    assert c.source("port") == "class %s.command_line_defaults['port']" % SPORK
    assert c.source("workers") == "class %s.prefork" % SPORK
    assert c.source("graceful_timeout") == "class %s.graceful_timeout" % SPORK
    assert c.source("log_level") == "default" and c.log_level == "info"
    # The original's -P/-I defaults folded into the one endpoint.
    assert c.endpoint == ["tcp:4321:interface=127.0.0.1"]


def test_spork_in_command_line_defaults_wins_over_prefork_and_a_spoon_has_one_process():
    c = build({"server": "config_servers.SporkFromDefaults"})
    assert (c.workers, c.source("workers")) == (
        5, "class config_servers.SporkFromDefaults.command_line_defaults['spork']")
    c = build({"server": "config_servers.PlainSpoon"})
    assert (c.workers, c.port, c.interface) == (1, 5000, "::0")


SOURCES = ["file", "env", "option"]


@settings(max_examples=60, deadline=None)
@given(st.fixed_dictionaries({}, optional={kind: st.integers(1, 64) for kind in SOURCES}))
def test_each_source_overrides_every_source_below_it(given_values):
    """Whatever subset of file, environment and command line sets ``workers``, the value is
    the one of the highest, and the source says which (the class's prefork = 3 otherwise)."""
    options, environ = {"server": SPORK}, {}
    with tempfile.TemporaryDirectory() as directory:
        if "file" in given_values:
            path = os.path.join(directory, "w.toml")
            with open(path, "w") as f:
                f.write("workers = %d\n" % given_values["file"])
            options["config"] = path
        if "env" in given_values:
            environ["SPOON_WORKERS"] = str(given_values["env"])
        if "option" in given_values:
            options["workers"] = str(given_values["option"])
        c = build(options, environ)
    assert c.errors == []
    winner = next((kind for kind in reversed(SOURCES) if kind in given_values), None)
    if winner is None:
        assert (c.workers, c.source("workers")) == (3, "class %s.prefork" % SPORK)
        return
    assert c.workers == given_values[winner]
    expected = {"file": "file ", "env": "env SPOON_WORKERS", "option": "option --spork"}[winner]
    assert c.source("workers").startswith(expected), c.source("workers")


def test_the_config_file_comes_from_the_option_before_spoon_config(tmp_path):
    from_env = toml(tmp_path, "workers = 2\n", "env.toml")
    from_option = toml(tmp_path, "workers = 6\n", "option.toml")
    c = build({"server": SPORK, "config": from_option}, {"SPOON_CONFIG": from_env})
    assert (c.workers, c.config_file) == (6, from_option)
    c = build({"server": SPORK}, {"SPOON_CONFIG": from_env})
    assert (c.workers, c.source("workers")) == (2, "file %s line 1" % from_env)


def test_endpoints_from_a_higher_source_replace_port_and_interface(tmp_path):
    path = toml(tmp_path, 'endpoint = ["tcp:7001", "tcp6:7002"]\n')
    c = build({"server": SPORK, "config": path})
    assert c.endpoint == ["tcp:7001", "tcp6:7002"]
    # ... and a port given above them folds into the endpoint again.
    c = build({"server": SPORK, "config": path, "port": "7003"})
    assert c.endpoint == ["tcp:7003:interface=127.0.0.1"]
    assert c.source("endpoint") == "port and interface"
    # The environment holds several, separated by spaces.
    c = build({"server": "config_servers.PlainSpoon"},
              {"SPOON_ENDPOINT": "tcp:30111  unix:/tmp/x.sock", "SPOON_WORKERS": "1"})
    assert c.endpoint == ["tcp:30111", "unix:/tmp/x.sock"]
    assert c.source("endpoint") == "env SPOON_ENDPOINT"


def test_a_udp_class_folds_port_and_interface_into_a_udp_endpoint():
    c = build({"server": "config_servers.UDPServer", "port": "0", "interface": "127.0.0.1"})
    assert c.endpoint == ["udp:0:interface=127.0.0.1"]


def test_twistd_options_are_settings_with_their_own_source():
    c = build({"server": SPORK}, host={"pid_file": ("/run/x.pid", "twistd --pidfile"),
                                       "reactor": ("poll", "twistd --reactor")})
    assert (c.pid_file, c.source("pid_file")) == ("/run/x.pid", "twistd --pidfile")
    assert (c.reactor, c.source("reactor")) == ("poll", "twistd --reactor")


def test_print_config_names_each_source():
    c = build({"server": SPORK, "log_format": "json", "print_config": True},
              {"SPOON_WORKERS": "4"})
    out, err = io.StringIO(), io.StringIO()
    assert config.check_and_print(c, out, err) == 0
    lines = out.getvalue().splitlines()
    assert "workers = 4  (env SPOON_WORKERS)" in lines
    assert 'log_format = "json"  (option --log-format)' in lines
    assert 'server = "%s"  (option --server)' % SPORK in lines
    assert "port = 4321  (class %s.command_line_defaults['port'])" % SPORK in lines


# -- validation: every error, at once ----------------------------------------------------------


@pytest.mark.parametrize(
    "options, environ, message",
    [
        ({"workers": "-2"}, {}, "--spork: must be at least 1, not -2"),
        ({"workers": "two"}, {}, "--spork: must be an integer, not 'two'"),
        ({"port": "70000"}, {}, "--port: must be between 0 and 65535, not 70000"),
        ({}, {"SPOON_PORT": "-1"}, "env SPOON_PORT: must be between 0 and 65535, not -1"),
        ({}, {"SPOON_GRACEFUL_TIMEOUT": "soon"}, "env SPOON_GRACEFUL_TIMEOUT: must be a number of seconds, not 'soon'"),
        ({"log_level": "loud"}, {}, "--log-level: must be one of debug, info, warning, error, critical, not 'loud'"),
        ({"log_format": "xml"}, {}, "--log-format: must be one of text, json, not 'xml'"),
        ({"endpoint": ["tcp:99999"]}, {}, "--endpoint 'tcp:99999' (option --endpoint): the port must be between 0 and 65535, not 99999"),
        ({"endpoint": ["tcp:port"]}, {}, "needs a numeric port"),
        ({"endpoint": ["udp:0"]}, {}, "is a TCP server"),
        ({"endpoint": ["tls:0"]}, {}, "cannot be pre-forked"),
    ],
)
def test_each_bad_value_is_one_line_naming_its_source(options, environ, message):
    c = build(dict(options, server=SPORK), environ)
    assert any(message in error for error in c.errors), c.errors
    assert all("\n" not in error for error in c.errors)


@pytest.mark.parametrize(
    "server, message",
    [
        ("no_such_module_q.Server", "--server: cannot import 'no_such_module_q.Server'"),
        ("config_servers.Missing", "module 'config_servers' has no attribute 'Missing'"),
        ("config_servers.NotAServer", "--server: 'config_servers.NotAServer' is not a spoon server class"),
        ("config_servers.NoGulp", "--server: NoGulp.handler_klass is <class 'object'>, not a request handler class"),
        ("config_servers.NoHandler", "--server: NoHandler has no handler: set handler_klass to a subclass of spoon.server.Gulp"),
        ("config_servers.BadDefaults", "class config_servers.BadDefaults.command_line_defaults['port']: must be between 0 and 65535, not 99999"),
        ("config_servers.make_factory", "'config_servers.make_factory' is not a spoon server class"),
    ],
)
def test_server_class_problems(server, message):
    c = build({"server": server})
    assert any(message in error for error in c.errors), c.errors


def test_the_pool_accepts_a_factory_callable():
    c = build({"server": "config_servers.make_factory"}, entry_point="prefork")
    assert c.errors == [] and callable(c.server_class)


def test_a_missing_server_says_how_to_give_one():
    assert build({}).errors == [
        "--server is required: the dotted path of a spoon server class, e.g. --server "
        "spoon.examples.EchoServer (or SPOON_SERVER, or server in a --config file)"
    ]


def test_every_error_of_every_source_is_reported_together(tmp_path):
    path = toml(tmp_path, 'port = 99999\nworkers = "four"\nwrokers = 2\n')
    c = config.build(
        "daemon",
        {"server": SPORK, "config": path, "graceful_timeout": "-1", "reactor": "nosuch",
         "uid": "no-such-user-q", "gid": "no-such-group-q"},
        environ={"SPOON_LOG_FORMAT": "xml"},
    )
    expected = [
        "--graceful-timeout: must be a number of seconds >= 0, not '-1'",
        "env SPOON_LOG_FORMAT: must be one of text, json, not 'xml'",
        "%s line 1: port: must be between 0 and 65535, not 99999" % path,
        "%s line 2: workers: must be an integer, not 'four'" % path,
        "%s line 3: unknown key 'wrokers'" % path,
        "reactor = \"nosuch\" (option --reactor): unknown reactor",
        "uid = \"no-such-user-q\" (option --uid): no such user",
        "gid = \"no-such-group-q\" (option --gid): no such group",
    ]
    for message in expected:
        assert any(error.startswith(message) for error in c.errors), (message, c.errors)
    assert len(c.errors) == len(expected), c.errors


def test_toml_syntax_error_names_the_file_and_the_line(tmp_path):
    path = toml(tmp_path, 'port = 30111\nworkers = = 2\n')
    [error] = build({"server": SPORK, "config": path}).errors
    assert error.startswith("%s: line 2, column " % path), error


def test_an_unreadable_config_file_is_an_error_not_a_traceback(tmp_path):
    missing = str(tmp_path / "missing.toml")
    [error] = build({"server": SPORK, "config": missing}).errors
    assert error == "%s: cannot read the configuration file: No such file or directory" % missing


def test_a_setting_another_entry_point_owns_is_ignored_with_a_warning(tmp_path):
    path = toml(tmp_path, 'pid_file = "/run/x.pid"\n')
    c = build({"server": SPORK, "config": path}, {"SPOON_NICE": "5"})
    assert c.errors == []
    assert c.pid_file is None
    assert sorted(c.warnings) == [
        "%s line 1: pid_file is ignored by twistd spoon: use twistd's own option before 'spoon'" % path,
        "env SPOON_NICE is ignored by twistd spoon (it is for the spoon command)",
    ]


def test_check_config_lists_every_error_and_returns_two():
    c = build({"server": SPORK, "check_config": True, "workers": "0", "port": "x"})
    out, err = io.StringIO(), io.StringIO()
    assert config.check_and_print(c, out, err) == 2
    assert err.getvalue().splitlines() == [
        "2 configuration error(s):",
        "  --port: must be an integer, not 'x'",
        "  --spork: must be at least 1, not 0",
    ]
    good = build({"server": SPORK, "check_config": True})
    assert config.check_and_print(good, out, err) == 0
    assert out.getvalue() == "configuration OK: %s\n" % SPORK


# -- one table, every command line --------------------------------------------------------------


def test_argparse_and_twistd_offer_the_same_spellings():
    from twisted.python import usage

    parser = config.add_arguments(argparse.ArgumentParser(), "daemon")
    argparse_flags = {flag for action in parser._actions for flag in action.option_strings}
    twisted = config.twisted_options("twistd")()
    twisted_flags = set()
    for name in twisted.synonyms:
        twisted_flags.add(("-" if len(name) == 1 else "--") + name)
    shared = [s for s in config.SETTINGS
              if {"twistd", "daemon"} <= set(s.entry_points) and not s.flags_in]
    assert len(shared) >= 6
    for setting in shared:
        for flag in setting.flags:
            if flag.startswith("-"):
                assert flag in argparse_flags and flag in twisted_flags, flag
    assert isinstance(twisted, usage.Options)


def test_argparse_command_line_builds_the_same_config_as_twistds():
    argv = ["-s", "4", "-e", "tcp:1", "--log-format", "json", "-d"]
    parser = config.add_arguments(argparse.ArgumentParser(), "daemon")
    from_argparse = config.from_arguments(parser.parse_args([SPORK] + argv), "daemon", environ={})
    twisted = config.twisted_options("twistd")()
    twisted.parseOptions(["--server", SPORK] + argv)
    for c in (from_argparse, twisted.config):
        assert c.errors == []
        assert (c.workers, c.endpoint, c.log_format, c.log_level) == (4, ["tcp:1"], "json", "debug")
        assert c.source("endpoint") == "option --endpoint"


@pytest.mark.parametrize("entry_point", ["twistd", "daemon"])
@pytest.mark.parametrize("description", ["unix:/tmp/x.sock", "systemd:domain=INET:index=0"])
def test_unix_and_systemd_endpoints_can_be_pre_forked(entry_point, description):
    c = build({"server": SPORK, "endpoint": [description], "workers": "3"}, {},
              entry_point=entry_point)
    assert c.errors == []


def test_the_spoon_command_refuses_what_only_twistd_serves_one_line_each():
    c = build({"server": SPORK, "endpoint": ["tcp:1", "tcp:2"]}, {}, entry_point="daemon")
    assert c.errors == ["--endpoint (option --endpoint): the spoon command serves one "
                        "endpoint, not 2 (twistd spoon serves several)"]
    c = build({"server": SPORK, "endpoint": ["tls:0"], "workers": "1"}, {},
              entry_point="daemon")
    assert c.errors == ["--endpoint 'tls:0' (option --endpoint): the spoon command "
                        "serves tcp:, tcp6:, udp:, unix:, ssl: and systemd: endpoints (twistd spoon "
                        "serves any kind)"]


def run_examples(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "spoon.examples", *args],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONPATH=ROOT, **(env or {})),
    )


def test_examples_command_checks_prints_and_versions_without_serving(tmp_path):
    done = run_examples("--check-config", "-P", "0")
    assert (done.returncode, done.stdout) == (0, "configuration OK\n"), done.stderr
    done = run_examples("--print-config", env={"SPOON_PORT": "30999"})
    assert done.returncode == 0, done.stderr
    assert "port = 30999  (env SPOON_PORT)" in done.stdout.splitlines()
    assert ('interface = "::0"  (class spoon.examples.EchoServer.command_line_defaults'
            "['interface'])") in done.stdout.splitlines(), done.stdout
    bad = toml(tmp_path, "port = 1e9\nlog_level = 3\n")
    done = run_examples("--check-config", "--config", bad, "-s", "-1")
    assert done.returncode == 2
    assert done.stderr.splitlines()[0] == "3 configuration error(s):", done.stderr
    done = run_examples("--version")
    assert (done.returncode, done.stdout) == (0, "spoon %s\n" % __version__)


def test_the_readme_example_file_is_a_valid_configuration(tmp_path):
    with open(os.path.join(ROOT, "README.rst")) as f:
        text = f.read()
    block = text.split("For example ``/etc/echo.toml``::\n\n", 1)[1].split("\n\n", 1)[0]
    path = toml(tmp_path, "\n".join(line[4:] for line in block.splitlines()) + "\n")
    c = build({"config": path}, {"SPOON_WORKERS": "8"})
    assert c.errors == []
    assert (c.server, c.workers, c.log_format) == ("spoon.examples.EchoServerForked", 8, "json")
    assert c.endpoint == ["tcp:30111:interface=127.0.0.1", "tcp6:30111:interface=\\:\\:1"]


def test_recorded_settings_build_the_same_configuration_again(tmp_path):
    """What ``restart`` keeps beside the pid file: given values, not the class's."""
    c = config.build("daemon", {"server": SPORK, "workers": "6", "log_file": "/tmp/x.log",
                                "endpoint": ["tcp6:2:interface=\\:\\:1"], "uid": "0"},
                     environ={"SPOON_LOG_FORMAT": "json"})
    text = c.recorded()
    assert "port" not in text and "graceful_timeout" not in text
    assert c.errors == []
    again = config.build("daemon", {"config": toml(tmp_path, text)}, environ={})
    assert again.errors == [] and again.values == c.values
    # restart: the record read in place of a file, anything given again winning.
    restarted = config.build("daemon", {"server": SPORK, "workers": "2"}, environ={},
                             recorded=(text, "recorded"))
    assert restarted.errors == []
    assert restarted.values == dict(c.values, workers=2)
    assert restarted.source("log_file") == "recorded: log_file"
    assert restarted.source("workers") == "option --spork"


def test_a_script_reads_the_class_then_the_file_then_the_environment(tmp_path):
    path = toml(tmp_path, "workers = 5\ngraceful_timeout = 2.5\n")
    c = config.build("script", environ={"SPOON_CONFIG": path, "SPOON_WORKERS": "6"},
                     server_class=config_servers.DefaultsSpork)
    assert c.errors == []
    assert (c.workers, c.graceful_timeout, c.worker_timeout) == (6, 2.5, 11.0)
    assert c.source("workers") == "env SPOON_WORKERS"
    assert c.source("worker_timeout") == "class config_servers.DefaultsSpork.worker_timeout"
    # What a script cannot use is ignored, with a warning.
    c = config.build("script", environ={"SPOON_PORT": "1"}, server_class=config_servers.DefaultsSpork)
    assert c.errors == [] and c.warnings == [
        "env SPOON_PORT is ignored by a server's own program (it is for twistd spoon, "
        "the spoon command, python -m spoon.examples)"]
