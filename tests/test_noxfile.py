"""``make test-all``'s choice of Pythons (noxfile.py), run in a child process with a PATH made
by the test: a supported version whose ``pythonX.Y`` runs is selected, an absent one is
skipped with a line saying so.  nox itself is not needed: the child gets a stand-in module
for the two names the noxfile takes from it (``options``, ``session``).
"""

import ast
import configparser
import os
import re
import subprocess
import sys

from support import ROOT

NOXFILE = os.path.join(ROOT, "noxfile.py")

CHILD = r"""
import json, sys, types
nox = types.ModuleType("nox")
nox.options = types.SimpleNamespace()
nox.session = lambda **kw: (lambda f: f)
sys.modules["nox"] = nox
namespace = {"__file__": sys.argv[1]}
exec(compile(open(sys.argv[1]).read(), sys.argv[1], "exec"), namespace)
print("PYTHONS", json.dumps(namespace["PYTHONS"]))
"""


def supported():
    with open(NOXFILE) as f:
        tree = ast.parse(f.read())
    [value] = [node.value for node in tree.body if isinstance(node, ast.Assign)
               and [getattr(t, "id", None) for t in node.targets] == ["SUPPORTED"]]
    return ast.literal_eval(value)


def _choose(tmp_path, names):
    """Run the noxfile's choice with only ``names`` (links to this Python) on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in names:
        os.symlink(sys.executable, bin_dir / name)
    env = {"PATH": str(bin_dir), "PYENV_ROOT": str(tmp_path / "no-pyenv"), "LANG": "C.UTF-8"}
    result = subprocess.run([sys.executable, "-c", CHILD, NOXFILE], capture_output=True,
                            text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    [chosen] = re.findall(r"^PYTHONS (.*)$", result.stdout, re.M)
    return ast.literal_eval(chosen.replace("null", "None")), result.stdout


def test_the_running_python_is_chosen_and_absent_ones_are_skipped_with_a_line(tmp_path):
    mine = "%d.%d" % sys.version_info[:2]
    assert mine in supported()
    chosen, output = _choose(tmp_path, ["python" + mine])
    assert chosen == [mine]
    for version in supported():
        skipped = "test-all: skipping Python %s: no working python%s" % (version, version)
        assert (skipped in output) == (version != mine), output


def test_a_name_that_runs_another_version_does_not_count(tmp_path):
    other = [v for v in supported() if v != "%d.%d" % sys.version_info[:2]][0]
    chosen, output = _choose(tmp_path, ["python" + other])  # a link to this Python
    assert chosen is None
    assert "skipping Python %s" % other in output
    assert "no supported Python found" in output


def test_classifiers_and_python_requires_name_the_versions_test_all_runs():
    config = configparser.ConfigParser()
    config.read(os.path.join(ROOT, "setup.cfg"))
    classifiers = config["metadata"]["classifiers"].split("\n")
    listed = [c.rsplit(" :: ", 1)[1] for c in classifiers
              if re.match(r"Programming Language :: Python :: 3\.\d+$", c)]
    assert listed == list(supported())
    assert config["options"]["python_requires"] == ">=%s" % supported()[0]
