"""The privilege tests from a checkout and an interpreter only root can read (issue 10,
point 1): a supervisor or worker that switched to nobody must not import, exec or look up
anything there after the switch.

The checkout is copied into a 0700 directory, next to a virtualenv of its own (the
interpreter's path is not even executable by nobody); the suite's uid tests then run from
that copy, as root, with the copy's ``spoon`` first on the path.
"""

import glob
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from support import ROOT, readable_by_others

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching user needs root")

#: The tests that run processes as nobody.
UID_TESTS = [
    "tests/test_prefork_cli.py::test_uid_gid_switch_user_before_forking",
    "tests/test_twistd.py::test_privileged_port_and_privilege_drop",
    "tests/test_daemon_user.py",
]


#: Left out of the private copy of the installed packages: test tools and installers (and
#: Twisted's own tests), which only the root test runner needs.
NOT_COPIED = (
    "pip", "pip-*", "setuptools", "setuptools-*", "_distutils_hack", "pkg_resources", "pygments",
    "hypothesis", "hypothesis-*", "_pytest", "pytest", "pytest-*", "py.py", "sentry_sdk",
    "test", "__pycache__", "*.pyc", "*.pth",
)


def _private_copy(base):
    """A copy of the checkout and a virtualenv in ``base`` (0700), whose interpreter sees
    the copy first and this environment's packages (Twisted...) after it."""
    os.chmod(base, 0o700)
    checkout = os.path.join(base, "checkout")
    shutil.copytree(
        ROOT,
        checkout,
        ignore=shutil.ignore_patterns(".venv", ".git", ".nox", "__pycache__", "*.pyc", "bench", "*.egg-info"),
    )
    venv = os.path.join(base, "venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=60)
    site = glob.glob(os.path.join(venv, "lib", "python3*", "site-packages"))[0]
    # What the servers import (Twisted, zope.interface, greenlet...) is private too; the
    # test tools and the editable install of this checkout stay where they are, after it.
    shutil.copytree(
        sysconfig.get_paths()["purelib"],
        os.path.join(base, "packages"),
        ignore=shutil.ignore_patterns(*NOT_COPIED),
    )
    with open(os.path.join(site, "spoon-private.pth"), "w") as f:
        f.write(
            "%s\nimport site; site.addsitedir(%r); site.addsitedir(%r)\n"
            % (checkout, os.path.join(base, "packages"), sysconfig.get_paths()["purelib"])
        )
    python = os.path.join(venv, "bin", "python")
    with open(os.path.join(venv, "bin", "twistd"), "w") as f:
        f.write("#!%s\nfrom twisted.scripts.twistd import run\nrun()\n" % python)
    os.chmod(os.path.join(venv, "bin", "twistd"), 0o755)
    return checkout, python


def test_the_privilege_tests_pass_from_a_checkout_only_root_can_read(tmp_path):
    base = str(tmp_path / "private")
    os.mkdir(base)
    checkout, python = _private_copy(base)
    assert not readable_by_others(os.path.join(checkout, "spoon", "server.py"))
    assert not readable_by_others(python)
    assert not readable_by_others(os.path.join(base, "packages", "twisted", "internet", "reactor.py"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS")}
    where = subprocess.run(
        [python, "-c", "import spoon, twisted; print(spoon.__file__, twisted.__file__)"], cwd="/", env=env, capture_output=True, text=True,
        timeout=60,
    )
    assert where.stdout.split() == [
        os.path.join(checkout, "spoon", "__init__.py"),
        os.path.join(base, "packages", "twisted", "__init__.py"),
    ], where
    run = subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *UID_TESTS],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert "skipped" not in summary and "passed" in summary, run.stdout[-3000:]
