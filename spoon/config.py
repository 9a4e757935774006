"""One configuration for every entry point, from four sources, each value knowing its own.

Sources, in increasing priority:

1. the server class: its attributes (``prefork``, ``graceful_timeout``, ``worker_timeout``)
   and its ``command_line_defaults`` (the original's dict: port, interface, pid_file,
   log_file, sentry_dsn, spork);
2. a TOML file (``--config FILE`` or ``SPOON_CONFIG``), flat keys named as in
   :data:`SETTINGS` (``workers = 4``, ``endpoint = ["tcp:30111", "unix:/run/x.sock"]``);
3. ``SPOON_*`` environment variables (``SPOON_WORKERS=4``; ``SPOON_ENDPOINT`` holds one or
   more endpoint strings separated by whitespace);
4. the command line (and, under twistd, twistd's own ``--reactor``, ``--uid``, ``--gid``,
   ``--pidfile``, ``--logfile``).

The option set is declared once, as data (:data:`SETTINGS`): from it come the TOML keys,
the environment variables, the ``twistd spoon`` options (:func:`twisted_options`) and the
``argparse`` arguments of the other entry points (:func:`add_arguments`).  :func:`build`
merges the sources and validates the result, collecting every error instead of stopping at
the first, so ``--check-config`` can list them all; ``--print-config`` shows each effective
value with where it came from (``workers = 4  (env SPOON_WORKERS)``).
"""

import os
import pwd
import grp
import re
import sys
from dataclasses import dataclass, field

from spoon import __version__
from spoon.net import parse_socket_endpoint
from spoon.targets import (
    TargetError,
    check_endpoint_kind,
    check_handler,
    is_datagram_server_class,
    is_server_class,
    resolve,
)

__all__ = [
    "ENTRY_POINTS",
    "SETTINGS",
    "Setting",
    "Config",
    "build",
    "add_arguments",
    "from_arguments",
    "twisted_options",
    "check_and_print",
    "TomlError",
]

#: Who reads a configuration: ``twistd spoon``, the ``spoon`` command (``python -m
#: spoon.daemon``), the pool's supervisor (``python -m spoon.prefork``), ``python -m
#: spoon.examples``, and a server run from a program of its own (``script``:
#: ``MyServer(address).serve_forever()``, no command line, so the class, ``SPOON_CONFIG``
#: and the environment).
ENTRY_POINTS = ("twistd", "daemon", "prefork", "examples", "script")

#: Priority of each kind of source, lowest first.
PRIORITY = {"default": 0, "class": 1, "file": 2, "env": 3, "option": 4}

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")


# -- value types: each turns a raw value (a string from the environment or the command
# line, a typed value from TOML or a class) into the setting's value, or raises ValueError
# with a message that reads after "NAME: ".


def _integer(low=None, high=None):
    def parse(value):
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError("must be an integer, not %r" % (value,))
        try:
            number = int(value)
        except ValueError:
            raise ValueError("must be an integer, not %r" % (value,)) from None
        if low is not None and high is not None and not low <= number <= high:
            raise ValueError("must be between %d and %d, not %d" % (low, high, number))
        if low is not None and number < low:
            raise ValueError("must be at least %d, not %d" % (low, number))
        return number

    parse.kind = "integer"
    return parse


def _seconds(value):
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("must be a number of seconds, not %r" % (value,))
    try:
        number = float(value)
    except ValueError:
        raise ValueError("must be a number of seconds, not %r" % (value,)) from None
    if not number >= 0:  # also refuses NaN
        raise ValueError("must be a number of seconds >= 0, not %r" % (value,))
    return number


_seconds.kind = "seconds"


def _text(value):
    if not isinstance(value, str):
        raise ValueError("must be a string, not %r" % (value,))
    return value


_text.kind = "string"


def _choice(*choices):
    def parse(value):
        if not isinstance(value, str) or value.lower() not in choices:
            raise ValueError("must be one of %s, not %r" % (", ".join(choices), value))
        return value.lower()

    parse.kind = "|".join(choices)
    return parse


def _id(value):
    """A user or group: a name or a number."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        raise ValueError("must be a name or a number, not %r" % (value,))
    if isinstance(value, int) or value.isdigit():
        return int(value)
    return value


_id.kind = "name or number"


def _endpoints(value):
    """One endpoint string, a list of them, or (environment) several separated by spaces."""
    if isinstance(value, str):
        value = value.split()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be endpoint strings (e.g. \"tcp:30111\"), not %r" % (value,))
    if not value:
        raise ValueError("must name at least one endpoint")
    return list(value)


_endpoints.kind = "endpoint list"


def _metrics_endpoint(value):
    """A tcp: endpoint string for the supervisor's Prometheus endpoint."""
    value = _text(value)
    spec = parse_socket_endpoint(value)
    if spec is None or spec.kind != "tcp":
        raise ValueError("must be a tcp: endpoint (e.g. tcp:9102:interface=127.0.0.1), not %r" % value)
    return value


_metrics_endpoint.kind = "tcp endpoint"


def _host_port(value):
    value = _text(value)
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError("must be HOST:PORT, not %r" % value)
    return value


_host_port.kind = "HOST:PORT"


def _networks(value):
    """Addresses or networks, as a list or one string separated by commas or spaces."""
    import ipaddress

    if isinstance(value, str):
        value = value.replace(",", " ").split()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be addresses or networks (e.g. \"10.0.0.0/24,::1\"), not %r" % (value,))
    for entry in value:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ValueError("%r is not an address or a network (e.g. 10.0.0.0/24)" % (entry,)) from None
    return list(value)


_networks.kind = "address list"


# -- the option set ---------------------------------------------------------------------


def _class_default(key):
    """A value from the class's ``command_line_defaults`` (None there means: not set)."""

    def from_class(klass, path):
        defaults = getattr(klass, "command_line_defaults", None) or {}
        if defaults.get(key) is None:
            return None
        return defaults[key], "class %s.command_line_defaults[%r]" % (path, key)

    return from_class


def _class_attribute(name):
    def from_class(klass, path):
        value = getattr(klass, name, None)
        if value is None:
            return None
        return value, "class %s.%s" % (path, name)

    return from_class


def _class_workers(klass, path):
    """The original's rule: ``command_line_defaults["spork"]``, else a Spork's ``prefork``,
    else one process."""
    from spoon.targets import is_spork

    found = _class_default("spork")(klass, path)
    if found is not None:
        return found
    if is_spork(klass):
        return max(1, int(getattr(klass, "prefork", 1) or 1)), "class %s.prefork" % path
    return 1, "class %s (a Spoon: one process)" % path


@dataclass(frozen=True)
class Setting:
    """One configurable value: its name (TOML key, ``Config`` attribute; the environment
    variable is ``SPOON_`` + the name in capitals), how a raw value is read, its help, its
    command-line spellings and the entry points that offer it."""

    name: str
    parse: object
    help: str
    flags: tuple = ()
    metavar: str = None
    entry_points: tuple = ENTRY_POINTS
    default: object = None
    from_class: object = None
    repeatable: bool = False
    #: ((flags...), value, help): flags that set a fixed value (the original's -d, -i).
    switches: tuple = ()
    #: entry point -> flags, where they differ from ``flags`` (a positional: a bare name).
    flags_in: dict = field(default_factory=dict)

    @property
    def env(self):
        return "SPOON_" + self.name.upper()

    def flags_for(self, entry_point):
        return self.flags_in.get(entry_point, self.flags)

    def label_for(self, entry_point):
        """How the command line of ``entry_point`` spells it, for messages."""
        flags = self.flags_for(entry_point)
        longs = [f for f in flags if f.startswith("--")]
        if longs:
            return longs[0]
        if flags and not flags[0].startswith("-"):  # a positional: as the usage names it
            return (self.metavar or self.name).upper()
        return flags[0] if flags else self.name


def _timeout_setting(name, text):
    """A number of seconds the pool uses, defaulting to the class attribute of that name."""
    return Setting(
        name, _seconds, "%s [default: the class's %s]." % (text, name),
        flags=("--" + name.replace("_", "-"),), metavar="SECONDS", default=30.0,
        from_class=_class_attribute(name),
        entry_points=("twistd", "daemon", "prefork", "script"),
    )


def _worker_limit_setting(name, metavar, text):
    """When a pre-forked worker is replaced; defaults to the class attribute of that name."""
    return Setting(
        name, _integer(0), "%s [default: the class's %s]." % (text, name),
        flags=("--" + name.replace("_", "-"),), metavar=metavar, default=0,
        from_class=_class_attribute(name),
        entry_points=("twistd", "daemon", "prefork", "script"),
    )


#: Settings that become attributes of the same name of the server object, read where it
#: serves (the pool's workers: spoon.pool.retire; the PROXY header check): every entry point
#: sets them with :func:`apply_server_attributes` (twistd passes them on to its
#: supervisor's command line with :func:`server_attribute_arguments`).
SERVER_ATTRIBUTES = ("max_requests", "max_requests_jitter", "max_worker_memory", "proxy_allow_from")


def _given_beyond_class(cfg):
    return [name for name in SERVER_ATTRIBUTES if cfg.kinds.get(name) in ("file", "env", "option")]


def apply_server_attributes(cfg, server):
    """Give ``server`` the attributes the configuration sets beyond its class (a file,
    ``SPOON_*``, an option); what only the class sets stays the class's."""
    for name in _given_beyond_class(cfg):
        value = cfg.values[name]
        setattr(server, name, tuple(value) if isinstance(value, list) else value)


def server_attribute_arguments(cfg):
    """The same, as options of ``python -m spoon.prefork``."""
    args = []
    for name in _given_beyond_class(cfg):
        value = cfg.values[name]
        args += ["--" + name.replace("_", "-"), ",".join(value) if isinstance(value, list) else str(value)]
    return args


SETTINGS = (
    Setting(
        "server", _text,
        "Dotted path of the spoon server class to run, e.g. spoon.examples.EchoServer.",
        flags=("--server",), metavar="CLASS", entry_points=("twistd", "daemon", "prefork"),
        flags_in={"daemon": ("server",), "prefork": ("--target",)},
    ),
    Setting(
        "endpoint", _endpoints,
        "Twisted server endpoint string to listen on, e.g. tcp:8080:interface=127.0.0.1 "
        "(repeatable; replaces --port/--interface given at the same or a lower priority). "
        "With --spork N > 1: tcp:, tcp6:, udp:, unix:, ssl: and systemd: endpoints (a "
        "socket that is bound once and handed to the workers; ssl: takes privateKey=, "
        "certKey=, extraCertChain=, dhParameters= and caCertsDir=, the directory of the CAs "
        "that sign the client certificates it then requires); udp: is for UDP servers.",
        flags=("-e", "--endpoint"), metavar="ENDPOINT", entry_points=("twistd", "daemon"),
        repeatable=True,
    ),
    Setting(
        "port", _integer(0, 65535),
        "Port to listen on [default: the class's command_line_defaults['port'], else 5000].",
        flags=("-P", "--port"), default=5000, from_class=_class_default("port"),
        entry_points=("twistd", "daemon", "examples"),
    ),
    Setting(
        "interface", _text,
        "Interface (address) to listen on [default: the class's "
        "command_line_defaults['interface'], else ::0]; an IPv6 address serves IPv4 too "
        "unless the class sets ipv6_only.",
        flags=("-I", "--interface"), default="::0", from_class=_class_default("interface"),
        entry_points=("twistd", "daemon", "examples"),
    ),
    Setting(
        "workers", _integer(1),
        "Pre-fork N worker processes [default: the class's command_line_defaults['spork'], "
        "else its prefork for a Spork, 1 for a Spoon]; 1 serves in one process.",
        flags=("-s", "--spork", "--workers"), metavar="N", default=1, from_class=_class_workers,
    ),
    _timeout_setting(
        "graceful_timeout",
        "Seconds a graceful stop waits for in-flight requests before closing them",
    ),
    _timeout_setting(
        "worker_timeout",
        "Seconds without a heartbeat after which a pre-forked worker is killed and replaced",
    ),
    _worker_limit_setting(
        "max_requests", "N",
        "Requests a pre-forked worker serves before it is replaced (its successor serves "
        "first; 0: never)",
    ),
    _worker_limit_setting(
        "max_requests_jitter", "N",
        "Up to N requests more than --max-requests, drawn per worker, so that workers "
        "started together are not replaced together",
    ),
    _worker_limit_setting(
        "max_worker_memory", "BYTES",
        "Resident bytes beyond which a pre-forked worker is replaced, checked between "
        "requests (0: no limit)",
    ),
    Setting(
        "proxy_allow_from", _networks,
        "Addresses or networks (comma-separated) allowed to send a PROXY protocol header, "
        "with a haproxy: endpoint or proxy_protocol = True [default: the class's "
        "proxy_allow_from, else 127.0.0.0/8,::1].",
        flags=("--proxy-allow-from",), metavar="NETWORKS",
        from_class=_class_attribute("proxy_allow_from"),
        entry_points=("twistd", "daemon", "prefork", "script"),
    ),
    Setting(
        "reactor", _text,
        "Reactor to run, by twistd short name (epoll, poll, select, asyncio...) "
        "[default: Twisted's default]. Under twistd: twistd --reactor.",
        flags=("--reactor",), metavar="NAME", entry_points=("daemon", "prefork"),
    ),
    Setting(
        "uid", _id, "User (name or number) to run as once the socket is bound. "
        "Under twistd: twistd --uid.",
        flags=("--uid",), metavar="USER", entry_points=("daemon", "prefork"),
    ),
    Setting(
        "gid", _id, "Group (name or number) to run as [default: the user's]. "
        "Under twistd: twistd --gid.",
        flags=("--gid",), metavar="GROUP", entry_points=("daemon", "prefork"),
    ),
    Setting(
        "pid_file", _text, "The daemon's pid file. Under twistd: twistd --pidfile.",
        flags=("-p", "--pid-file"), metavar="FILE", from_class=_class_default("pid_file"),
        entry_points=("daemon",),
    ),
    Setting(
        "log_file", _text,
        "Log file, appended to and reopened when logrotate moves it away [default: "
        "stderr]. Under twistd: twistd --logfile.",
        flags=("-L", "--log-file"), metavar="FILE", from_class=_class_default("log_file"),
        entry_points=("daemon", "prefork", "examples", "script"),
    ),
    Setting(
        "log_level", _choice(*LOG_LEVELS),
        "Lowest level logged: debug, info, warning, error or critical [default: info].",
        flags=("--log-level",), metavar="LEVEL", default="info",
        switches=((("-d", "--debug"), "debug", "Log debug records (--log-level debug)."),
                  (("-i", "--info"), "info", "Log info records (--log-level info).")),
    ),
    Setting(
        "log_format", _choice(*LOG_FORMATS),
        "text (TIME LEVEL [PID] LOGGER: MESSAGE) or json (one object a line, for log "
        "shippers) [default: text].",
        flags=("--log-format",), metavar="FORMAT", default="text",
    ),
    Setting(
        "nice", _integer(-20, 19),
        "'nice' increment of the daemon's processes [default: the command's].",
        flags=("-n", "--nice"), metavar="N", from_class=_class_default("nice"),
        entry_points=("daemon",),
    ),
    Setting(
        "sentry_dsn", _text,
        "Report warnings and errors to this Sentry DSN (needs sentry-sdk).",
        flags=("-S", "--sentry-dsn"), metavar="DSN", from_class=_class_default("sentry_dsn"),
        entry_points=("daemon",),
    ),
)

SETTINGS += (
    Setting(
        "metrics", _metrics_endpoint,
        "Serve Prometheus metrics from the supervisor on this tcp: endpoint, e.g. "
        "tcp:9102:interface=127.0.0.1 (needs prometheus_client: spoon[metrics]).",
        flags=("--metrics",), metavar="ENDPOINT",
        entry_points=("twistd", "daemon", "prefork", "script"),
    ),
    Setting(
        "statsd", _host_port,
        "Push the pool's counters and gauges to statsd at HOST:PORT (UDP) every second.",
        flags=("--statsd",), metavar="HOST:PORT",
        entry_points=("twistd", "daemon", "prefork", "script"),
    ),
    Setting(
        "status_format", _choice("text", "json"),
        "How `status` prints the pool: text (a table) or json [default: text].",
        flags=("--status-format",), metavar="FORMAT", default="text",
        entry_points=("daemon",),
        switches=((("--json",), "json", "`status` prints one JSON object (--status-format json)."),),
    ),
)

BY_NAME = {setting.name: setting for setting in SETTINGS}

#: What a host program's own options may set (twistd's), by setting name.
HOST_SETTINGS = ("reactor", "uid", "gid", "pid_file", "log_file")

CONFIG_HELP = "TOML file of settings (keys as in --print-config) [env SPOON_CONFIG]."
CHECK_HELP = ("Validate the configuration, import the server class, bind nothing; "
              "exit 0, or 2 listing every error.")
PRINT_HELP = "Print each effective setting and where it came from, then exit."
VERSION_TEXT = "spoon %s" % __version__


# -- TOML --------------------------------------------------------------------------------


class TomlError(ValueError):
    """A configuration file that cannot be read or parsed; the message names the file and,
    when known, the line."""


def _toml_module():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    return tomllib


def read_toml(path):
    """The table in the TOML file ``path``; :class:`TomlError` naming the file (and the
    line, for a syntax error) when it cannot be read or parsed."""
    tomllib = _toml_module()
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise TomlError("%s: cannot read the configuration file: %s" % (path, e.strerror)) from None
    except tomllib.TOMLDecodeError as e:
        raise TomlError("%s: %s" % (path, _toml_message(e))) from None


def _toml_message(error):
    """'line N: what' from tomllib's "what (at line N, column M)"."""
    text = str(error)
    match = re.search(r"^(.*) \(at line (\d+), column (\d+)\)$", text)
    if match:
        return "line %s, column %s: %s" % (match.group(2), match.group(3), match.group(1))
    return text


def _key_line(path, key):
    """The line of ``key = ...`` in ``path`` (for messages about a key), or None."""
    pattern = re.compile(r"^\s*[\"']?%s[\"']?\s*=" % re.escape(key))
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if pattern.match(line):
                    return number
    except OSError:
        pass
    return None


# -- the configuration -------------------------------------------------------------------


class Config:
    """The effective settings of one entry point: ``config.workers``, ``config.endpoint``
    and so on for every name in :data:`SETTINGS` (None when nothing set it), where each came
    from (:meth:`source`), the resolved ``server_class``, and every ``errors`` (and
    ``warnings``) found while building it."""

    def __init__(self, entry_point):
        self.entry_point = entry_point
        self.values = {}
        self.sources = {}
        #: name -> the kind of source that set it (see PRIORITY), "derived" for endpoints
        #: folded from port and interface.
        self.kinds = {}
        self.errors = []
        self.warnings = []
        self.server_class = None
        self.config_file = None
        self.check_config = False
        self.print_config = False

    def __getattr__(self, name):
        if name in BY_NAME:
            return self.values.get(name)
        raise AttributeError(name)

    def source(self, name):
        """Where the value of ``name`` came from: "default", "class X.prefork",
        "file /etc/spoon.toml", "env SPOON_WORKERS", "option --spork"..."""
        return self.sources.get(name, "default")

    def recorded(self):
        """The settings given by a file, the environment or the command line, as TOML text
        that :func:`build` reads back (``--config``) to the same values: what ``restart``
        needs to start the instance again as it was started."""
        lines = []
        for setting in SETTINGS:
            if self.kinds.get(setting.name) in ("file", "env", "option"):
                lines.append("%s = %s" % (setting.name, _toml_value(self.values[setting.name])))
        return "".join(line + "\n" for line in lines)

    def describe(self):
        """One line per setting: ``name = value  (source)``."""
        lines = []
        for setting in SETTINGS:
            if setting.name not in self.values and setting.entry_points and (
                self.entry_point not in setting.entry_points
            ):
                continue
            value = self.values.get(setting.name)
            shown = "(not set)" if value is None else _toml_value(value)
            lines.append("%s = %s  (%s)" % (setting.name, shown, self.source(setting.name)))
        return lines


def _toml_value(value):
    if isinstance(value, str):
        return '"%s"' % value.replace("\\", "\\\\").replace('"', '\\"')
    if isinstance(value, list):
        return "[%s]" % ", ".join(_toml_value(v) for v in value)
    return repr(value)


class _Layer:
    """The values one source gave, each with the label messages name it by."""

    def __init__(self, kind):
        self.kind = kind
        self.values = {}
        self.labels = {}

    def add(self, setting, raw, label, errors):
        try:
            value = setting.parse(raw)
        except ValueError as e:
            errors.append("%s: %s" % (label, e))
            return
        self.values[setting.name] = value
        self.labels[setting.name] = label


def build(entry_point, options=None, environ=None, host=None, server_class=None,
          recorded=None):
    """Merge and validate the configuration of ``entry_point`` (one of
    :data:`ENTRY_POINTS`).

    ``options``: what the command line gave, by setting name (raw strings; "endpoint" a
    list), plus "config" (the file), "check_config" and "print_config".  ``environ``:
    default ``os.environ``.  ``host``: settings the host program's own options gave, by
    name, as ``(value, label)`` (twistd's ``--pidfile``...).  ``server_class``: the class,
    for an entry point that serves a fixed one (the examples); otherwise the "server"
    setting names it.  ``recorded``: ``(toml_text, label)``, settings a running instance
    recorded (:meth:`Config.recorded`), read in place of the configuration file when none
    is given: the ``spoon`` command's ``restart``.

    Never raises for a bad configuration: every problem is in ``config.errors``.
    """
    if entry_point not in ENTRY_POINTS:
        raise ValueError("unknown entry point %r" % (entry_point,))
    options = dict(options or {})
    environ = os.environ if environ is None else environ
    config = Config(entry_point)
    config.check_config = bool(options.pop("check_config", False))
    config.print_config = bool(options.pop("print_config", False))
    errors, warnings = config.errors, config.warnings

    offered = [s for s in SETTINGS if entry_point in s.entry_points]

    command_line = _Layer("option")
    for setting in offered:
        if options.get(setting.name) is not None:
            command_line.add(setting, options[setting.name], setting.label_for(entry_point), errors)
    for name, (value, label) in (host or {}).items():
        if value is not None:
            command_line.add(BY_NAME[name], value, label, errors)

    env = _Layer("env")
    for setting in SETTINGS:
        if setting.env in environ:
            if setting in offered:
                env.add(setting, environ[setting.env], "env " + setting.env, errors)
            else:
                warnings.append("env %s is ignored by %s" % (setting.env, _ignored_hint(setting, entry_point)))

    path = options.get("config")
    if path is None and environ.get("SPOON_CONFIG"):
        path = environ["SPOON_CONFIG"]
    file_layer = _Layer("file")
    if path:
        config.config_file = path
        _read_file_layer(path, file_layer, offered, entry_point, errors, warnings)
    elif recorded is not None:
        text, where = recorded
        try:
            table = _toml_module().loads(text)
        except ValueError as e:
            errors.append("%s: %s" % (where, _toml_message(e)))
            table = {}
        for key, raw in table.items():
            setting = BY_NAME.get(key)
            if setting is not None and setting in offered:
                file_layer.add(setting, raw, "%s: %s" % (where, key), errors)

    layers = [command_line, env, file_layer]  # highest priority first
    klass_path = None
    if server_class is not None:
        config.server_class = server_class
        klass_path = "%s.%s" % (server_class.__module__, server_class.__qualname__)
    else:
        for layer in layers:
            if "server" in layer.values:
                klass_path = layer.values["server"]
                config.server_class = _check_server(
                    klass_path, layer.labels["server"], entry_point, errors
                )
                break
        else:
            if BY_NAME["server"] in offered:
                errors.append(
                    "%s is required: the dotted path of a spoon server class, e.g. %s "
                    "spoon.examples.EchoServer (or SPOON_SERVER, or server in a --config file)"
                    % (_server_flag(entry_point), _server_flag(entry_point))
                )

    class_layer = _Layer("class")
    klass = config.server_class
    if klass is not None and is_server_class(klass):
        for setting in offered:
            if setting.from_class is not None:
                found = setting.from_class(klass, klass_path)
                if found is not None:
                    class_layer.add(setting, found[0], found[1], errors)
    layers.append(class_layer)

    for setting in offered:
        for layer in layers:
            if setting.name in layer.values:
                config.values[setting.name] = layer.values[setting.name]
                config.sources[setting.name] = _source_text(layer, setting.name)
                config.kinds[setting.name] = layer.kind
                break
        else:
            if setting.default is not None:
                config.values[setting.name] = setting.default
    for name, (value, label) in (host or {}).items():
        if value is not None and name in command_line.values:
            config.values[name] = command_line.values[name]
            config.sources[name] = label
            config.kinds[name] = "option"

    _fold_endpoints(config)
    _validate(config)
    return config


def _server_flag(entry_point):
    return BY_NAME["server"].label_for(entry_point).upper() if entry_point == "daemon" else (
        BY_NAME["server"].label_for(entry_point)
    )


#: How messages name each entry point.
COMMANDS = {
    "twistd": "twistd spoon",
    "daemon": "the spoon command",
    "prefork": "python -m spoon.prefork",
    "examples": "python -m spoon.examples",
    "script": "a server's own program",
}


def _ignored_hint(setting, entry_point):
    if entry_point == "twistd" and setting.name in HOST_SETTINGS:
        return "twistd spoon: use twistd's own option before 'spoon'"
    return "%s (it is for %s)" % (
        COMMANDS[entry_point], ", ".join(COMMANDS[e] for e in setting.entry_points))


def _source_text(layer, name):
    label = layer.labels[name]
    if layer.kind == "option" and not label.startswith("twistd"):
        return "option " + label
    return label


def _read_file_layer(path, layer, offered, entry_point, errors, warnings):
    try:
        table = read_toml(path)
    except TomlError as e:
        errors.append(str(e))
        return
    for key, raw in table.items():
        setting = BY_NAME.get(key)
        line = _key_line(path, key)
        where = "%s line %d" % (path, line) if line else path
        if setting is None:
            errors.append(
                "%s: unknown key %r (known: %s)" % (where, key, ", ".join(s.name for s in SETTINGS))
            )
        elif setting not in offered:
            warnings.append("%s: %s is ignored by %s" % (where, key, _ignored_hint(setting, entry_point)))
        else:
            layer.add(setting, raw, "%s: %s" % (where, key), errors)
            if key in layer.labels:
                layer.labels[key] = "file %s" % where


def _check_server(path, label, entry_point, errors):
    """The class (or, for the pool's supervisor, factory callable) ``path`` names; None
    with an error when it does not import or is not something spoon can serve."""
    # Like "python -m": modules of the current directory can be named.
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj = resolve(path)
    except TargetError as e:
        errors.append("%s: %s" % (label, e))
        return None
    if entry_point == "prefork" and callable(obj) and not isinstance(obj, type):
        return obj  # a callable returning a Twisted factory
    if not is_server_class(obj):
        errors.append(
            "%s: %r is not a spoon server class (a subclass of TCPSpoon, UDPSpoon, TCPSpork "
            "or UDPSpork): it is %r" % (label, path, obj)
        )
        return None
    try:
        check_handler(obj)
    except TypeError as e:
        errors.append("%s: %s" % (label, e))
        return None
    return obj


def _fold_endpoints(config):
    """The original's --port/--interface as an endpoint: used unless endpoints were given at
    the same or a higher priority than both."""
    if "endpoint" not in BY_NAME or config.entry_point not in BY_NAME["endpoint"].entry_points:
        return

    def level(name):
        return PRIORITY.get(config.kinds.get(name), 0)

    if "endpoint" in config.kinds and level("endpoint") >= max(level("port"), level("interface")):
        return
    datagram = config.server_class is not None and is_datagram_server_class(config.server_class)
    port, interface = config.values.get("port"), config.values.get("interface")
    if port is None or interface is None:
        return
    config.values["endpoint"] = [
        "%s:%d:interface=%s" % ("udp" if datagram else "tcp", port, _escape(interface))
    ]
    config.sources["endpoint"] = "port and interface"
    config.kinds["endpoint"] = "derived"


def _escape(text):
    return str(text).replace("\\", "\\\\").replace(":", "\\:")


def _validate(config):
    """Checks across settings, appending to ``config.errors``."""
    errors = config.errors

    def label(name):
        return "%s = %s (%s)" % (name, _toml_value(config.values[name]), config.source(name))

    if config.values.get("reactor") is not None:
        from twisted.application.reactors import getReactorTypes

        names = sorted(r.shortName for r in getReactorTypes())
        if config.values["reactor"] not in names:
            errors.append("%s: unknown reactor (known: %s)" % (label("reactor"), ", ".join(names)))
    if config.values.get("uid") is not None and isinstance(config.values["uid"], str):
        try:
            pwd.getpwnam(config.values["uid"])
        except KeyError:
            errors.append("%s: no such user" % label("uid"))
    if config.values.get("gid") is not None and isinstance(config.values["gid"], str):
        try:
            grp.getgrnam(config.values["gid"])
        except KeyError:
            errors.append("%s: no such group" % label("gid"))
    klass = config.server_class
    workers = config.values.get("workers") or 1
    endpoints = config.values.get("endpoint") or ()
    if config.entry_point == "daemon" and len(endpoints) > 1:
        errors.append(
            "%s (%s): the spoon command serves one endpoint, not %d (twistd spoon serves "
            "several)" % (BY_NAME["endpoint"].label_for("daemon"), config.source("endpoint"),
                          len(endpoints))
        )
    for description in endpoints:
        where = "%s %r (%s)" % (
            BY_NAME["endpoint"].label_for(config.entry_point), description, config.source("endpoint")
        )
        try:
            spec = parse_socket_endpoint(description)
        except ValueError as e:
            errors.append("%s: %s" % (where, e))
            continue
        if spec is not None and spec.port is not None and not 0 <= spec.port <= 65535:
            errors.append("%s: the port must be between 0 and 65535, not %d" % (where, spec.port))
            continue
        if spec is None and config.entry_point == "daemon":
            errors.append(
                "%s: the spoon command serves tcp:, tcp6:, udp:, unix:, ssl: and systemd: endpoints "
                "(twistd spoon serves any kind)" % where
            )
            continue
        if klass is None or not is_server_class(klass):
            continue
        try:
            check_endpoint_kind(klass, spec is not None and spec.datagram, description)
        except ValueError as e:
            errors.append("%s: %s" % (where, e))
            continue
        if spec is None and workers > 1:
            errors.append(
                "%s cannot be pre-forked: with %d workers only tcp:, tcp6:, udp:, unix:, ssl: and "
                "systemd: endpoints name a socket that can be bound and handed to the workers "
                "(use --spork 1 to serve it in one process)" % (where, workers)
            )


# -- command lines -----------------------------------------------------------------------


def add_arguments(parser, entry_point):
    """Add the options of ``entry_point`` to an ``argparse`` parser (with ``--config``,
    ``--check-config``, ``--print-config`` and ``--version``).  Options left out are absent
    from the parsed namespace, so :func:`from_arguments` knows what was given."""
    import argparse

    if entry_point not in ENTRY_POINTS:
        raise ValueError("unknown entry point %r" % (entry_point,))
    for setting in SETTINGS:
        if entry_point not in setting.entry_points:
            continue
        flags = setting.flags_for(entry_point)
        if flags and not flags[0].startswith("-"):
            parser.add_argument(setting.name, metavar=setting.metavar or setting.name.upper(),
                                help=setting.help)
            continue
        parser.add_argument(
            *flags, dest=setting.name, metavar=setting.metavar, help=setting.help,
            action="append" if setting.repeatable else "store", default=argparse.SUPPRESS,
        )
        for switch_flags, value, text in setting.switches:
            parser.add_argument(*switch_flags, dest=setting.name, action="store_const",
                                const=value, help=text, default=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="FILE", help=CONFIG_HELP, default=argparse.SUPPRESS)
    parser.add_argument("--check-config", action="store_true", help=CHECK_HELP,
                        default=argparse.SUPPRESS)
    parser.add_argument("--print-config", action="store_true", help=PRINT_HELP,
                        default=argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=VERSION_TEXT)
    return parser


#: The configuration a command-line entry point of this process built, None while none
#: did: a server's own ``serve_forever()`` reads ``SPOON_*`` itself only in a program that
#: runs it directly (the "script" entry point), never over what a command line decided.
_command_line_config = None


def command_line_configuration():
    """The configuration this process's command-line entry point built (None if none)."""
    return _command_line_config


def from_arguments(namespace, entry_point, environ=None, server_class=None, recorded=None):
    """:func:`build` from a namespace parsed by a parser :func:`add_arguments` filled;
    it becomes this process's :func:`command_line_configuration`."""
    global _command_line_config
    given = vars(namespace)
    names = set(BY_NAME) | {"config", "check_config", "print_config"}
    config = build(
        entry_point,
        {name: value for name, value in given.items() if name in names},
        environ=environ,
        server_class=server_class,
        recorded=recorded,
    )
    _command_line_config = config
    return config


def check_and_print(config, out=None, err=None):
    """Act on ``--print-config`` and ``--check-config``: the exit status (0, or 2 with the
    errors listed on ``err``) when one of them was given, None when the entry point goes on.
    Warnings go to ``err`` either way."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    if not (config.check_config or config.print_config):
        return None
    for warning in config.warnings:
        err.write("warning: %s\n" % warning)
    if config.print_config:
        for line in config.describe():
            out.write(line + "\n")
    if config.errors:
        err.write("%d configuration error(s):\n" % len(config.errors))
        for error in config.errors:
            err.write("  %s\n" % error)
        return 2
    if config.check_config:
        out.write("configuration OK%s\n" % (
            ": %s" % config.server.strip() if config.values.get("server") else ""))
    return 0


def twisted_options(entry_point="twistd"):
    """A ``twisted.python.usage.Options`` class for ``entry_point``, generated from
    :data:`SETTINGS`.  After parsing, ``options.config`` is the :class:`Config`;
    ``--check-config``, ``--print-config`` and ``--version`` exit (``SystemExit``) from
    the parsing itself, before twistd binds or daemonises anything; so does a bad
    configuration: one line per error on stderr, status 2."""
    from twisted.python import usage

    def handler(name, takes_value, repeatable=False, const=None, doc=""):
        if takes_value and repeatable:
            def opt(self, value):
                self.given.setdefault(name, []).append(value)
        elif takes_value:
            def opt(self, value):
                self.given[name] = value
        else:
            def opt(self):
                self.given[name] = True if const is None else const
        opt.__doc__ = doc
        return opt

    namespace = {}

    def declare(flags, make, doc):
        # usage.Options shows one long name per handler: a second long spelling gets a
        # handler of its own ("Same as --spork."); short flags share the first's.
        longs = [f for f in flags if f.startswith("--")]
        first = make(doc)
        for flag in flags:
            if flag.startswith("--") and flag != longs[0]:
                method = make("Same as %s." % longs[0])
            else:
                method = first
            namespace["opt_" + flag.lstrip("-").replace("-", "_")] = method

    for setting in SETTINGS:
        if entry_point not in setting.entry_points:
            continue
        declare(setting.flags_for(entry_point),
                lambda doc, s=setting: handler(s.name, True, s.repeatable, doc=doc), setting.help)
        for switch_flags, value, text in setting.switches:
            declare(switch_flags,
                    lambda doc, s=setting, v=value: handler(s.name, False, const=v, doc=doc), text)
    namespace["opt_config"] = handler("config", True, doc=CONFIG_HELP)
    namespace["opt_check_config"] = handler("check_config", False, doc=CHECK_HELP)
    namespace["opt_print_config"] = handler("print_config", False, doc=PRINT_HELP)

    def __init__(self):
        usage.Options.__init__(self)
        self.given = {}
        self.config = None

    def opt_version(self):
        """Print spoon's version and exit."""
        print(VERSION_TEXT)
        sys.exit(0)

    def postOptions(self):
        parent = getattr(self, "parent", None)
        host = _twistd_host_settings(parent) if parent is not None else None
        self.config = build(entry_point, self.given, host=host)
        status = check_and_print(self.config)
        if status is not None:
            sys.stdout.flush()
            raise SystemExit(status)
        if self.config.errors:
            # One line each and status 2, as in every entry point (a UsageError would
            # bury them under twistd's whole help text).
            for error in self.config.errors:
                sys.stderr.write("%s: error: %s\n" % (COMMANDS[entry_point], error))
            sys.stderr.flush()
            raise SystemExit(2)

    namespace.update(__init__=__init__, opt_version=opt_version, postOptions=postOptions)
    return type("Options", (usage.Options,), namespace)


def _twistd_host_settings(parent):
    """twistd's own options that are settings, as ``build``'s ``host``."""
    found = {}
    for name, key in (("reactor", "reactor"), ("uid", "uid"), ("gid", "gid"),
                      ("pid_file", "pidfile"), ("log_file", "logfile")):
        value = parent.get(key) if hasattr(parent, "get") else None
        if value not in (None, ""):
            found[name] = (value, "twistd --%s" % key)
    return found
