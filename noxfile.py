"""``make test-all``: the whole test suite on every supported Python found on this machine.

One nox session per version (``tests-3.10`` ... ``tests-3.13``), each in its own virtualenv
under ``.venv/nox/`` (inside the ignored ``.venv``, which ``make clean`` removes and the
packaging test's copy of the checkout leaves out), with spoon installed as ``make test``
installs it (editable, "compat" mode, so that ``twisted/plugins/spoon_plugin.py`` stays
visible to twistd's plugin discovery; ``tests/test_twistd.py`` checks it in every session).

A version is used only when an interpreter for it really runs: a pyenv shim for a version
pyenv does not select fails, so such a version is looked up among pyenv's installed versions
(and made runnable through ``PYENV_VERSION``) before it counts as absent.  An absent version
is skipped with a line saying so, never an error: a machine has the versions it has.
"""

import glob
import os
import shutil
import subprocess

import nox

SUPPORTED = ("3.10", "3.11", "3.12", "3.13")

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True
nox.options.envdir = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".venv", "nox")


def _runs_as(command, version, env=None):
    """True when ``command`` is a working interpreter of ``version``."""
    try:
        result = subprocess.run(
            [command, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and result.stdout.strip() == version


def _pyenv_version_for(version):
    """The newest pyenv-installed version name for ``version`` ("3.10.13"), or None."""
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    found = glob.glob(os.path.join(root, "versions", version + ".*", "bin", "python" + version))
    names = [path.split(os.sep)[-3] for path in found]
    names = [n for n in names if n.replace(".", "").isdigit()]
    return max(names, key=lambda n: [int(p) for p in n.split(".")]) if names else None


def _pyenv_selection():
    """The versions pyenv selects now (kept first, so plain ``python3`` does not change)."""
    if os.environ.get("PYENV_VERSION"):
        return os.environ["PYENV_VERSION"].split(":")
    try:
        result = subprocess.run(
            ["pyenv", "version-name"], capture_output=True, text=True, timeout=60,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return result.stdout.strip().split(":") if result.returncode == 0 else []


def available_pythons():
    """The supported versions whose ``pythonX.Y`` runs here; prints a line per absent one."""
    found = []
    selection = None
    for version in SUPPORTED:
        command = "python" + version
        if shutil.which(command) and _runs_as(command, version):
            found.append(version)
            continue
        name = _pyenv_version_for(version)
        if name and shutil.which(command):
            # A pyenv shim for a version pyenv does not select: select that version too.
            if selection is None:
                selection = _pyenv_selection()
            env = dict(os.environ, PYENV_VERSION=":".join(selection + [name]))
            if _runs_as(command, version, env):
                selection.append(name)
                os.environ["PYENV_VERSION"] = env["PYENV_VERSION"]
                found.append(version)
                continue
        print("test-all: skipping Python %s: no working %s on this machine" % (version, command))
    return found


PYTHONS = available_pythons()
if not PYTHONS:
    # None of them: nox's own interpreter, whatever it is, rather than running nothing.
    print("test-all: no supported Python found; running on nox's own interpreter")
    PYTHONS = None


@nox.session(python=PYTHONS)
def tests(session):
    """The suite, as ``make test`` runs it, on one Python version."""
    session.install("--disable-pip-version-check", "-q", "-e", ".[test]",
                    "--config-settings", "editable_mode=compat")
    session.run("python", "-m", "pytest", *session.posargs)
