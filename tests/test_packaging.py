"""Packaging: what the wheel and the sdist hold (the licence in both), and that installing
and uninstalling the wheel in a scratch virtualenv never harms Twisted or its plugin cache.

The wheel and the sdist are built once per module from a copy of this checkout (so the
builds write no ``build/`` or ``*.egg-info`` into the tree the other tests run from).  The
wheel is built by ``pip wheel``; the sdist by the PEP 517 backend that ``pyproject.toml``
names, installed for the occasion into a scratch directory (what ``python -m build --sdist``
does, without needing the ``build`` package).

``test_scratch_venv_install_and_uninstall`` is the SLOW one (about 10 s): it creates a plain
virtualenv (no ``--system-site-packages``), installs Twisted and the other requirements in it
with the pip of the running environment (``pip --python``), then our wheel, and runs the
venv's own ``twistd`` several times.
"""

import ctypes
import glob
import os
import re
import shutil
import tarfile
import subprocess
import sys
import zipfile

import pytest

from support import ROOT

IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
    ".hypothesis", "out",
)


def _pip(*args, python=None, timeout=300):
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    if python:
        command += ["--python", python]
    result = subprocess.run(
        command + list(args), capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A copy of this checkout to build from."""
    path = tmp_path_factory.mktemp("source") / "spoon"
    shutil.copytree(ROOT, path, ignore=IGNORE, symlinks=True)
    return path


@pytest.fixture(scope="module")
def wheel(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    _pip("wheel", "-q", "--no-deps", "-w", str(out), str(source))
    [path] = glob.glob(str(out / "spoon-*.whl"))
    return path


@pytest.fixture(scope="module")
def sdist(source, tmp_path_factory):
    with open(source / "pyproject.toml") as f:
        pyproject = f.read()
    backend = re.search(r'^build-backend\s*=\s*"([^"]+)"', pyproject, re.M).group(1)
    requires = re.findall(r'"([^"]+)"', re.search(r"^requires\s*=\s*\[([^]]*)\]", pyproject,
                                                 re.M).group(1))
    backend_dir = tmp_path_factory.mktemp("backend")
    _pip("install", "-q", "--no-compile", "--target", str(backend_dir), *requires)
    out = tmp_path_factory.mktemp("sdist")
    result = subprocess.run(
        [sys.executable, "-c",
         "import importlib, sys; print(importlib.import_module(sys.argv[1]).build_sdist(sys.argv[2]))",
         backend, str(out)],
        capture_output=True, text=True, timeout=300, cwd=source, stdin=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONPATH=str(backend_dir)),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return str(out / result.stdout.strip().splitlines()[-1])


def _license_text():
    with open(os.path.join(ROOT, "LICENSE"), "rb") as f:
        return f.read()


def test_license_is_the_gpl_2_or_later_that_setup_cfg_names():
    text = _license_text().decode()
    with open(os.path.join(ROOT, "setup.cfg")) as f:
        assert re.search(r"^license = GPL-2\.0-or-later$", f.read(), re.M)
    assert "GNU GENERAL PUBLIC LICENSE\n                       Version 2, June 1991" in text
    header = " ".join(text.split("GNU GENERAL PUBLIC")[0].split())
    assert "either version 2 of the License, or (at your option) any later version" in header
    assert "SpamExperts B.V." in header and "the spoon contributors" in header


def test_wheel_carries_the_license(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        [license_file] = [n for n in names if re.match(r"[^/]+\.dist-info/(licenses/)?LICENSE$", n)]
        assert zf.read(license_file) == _license_text()
        metadata = zf.read([n for n in names if n.endswith(".dist-info/METADATA")][0]).decode()
    assert re.search(r"^License-File: LICENSE$", metadata, re.M)
    assert re.search(r"^License: GPL-2\.0-or-later$", metadata, re.M)


def test_sdist_carries_the_license_changelog_and_examples(sdist):
    with tarfile.open(sdist) as tf:
        names = tf.getnames()
        top = names[0].split("/")[0]
        assert tf.extractfile("%s/LICENSE" % top).read() == _license_text()
        pkg_info = tf.extractfile("%s/PKG-INFO" % top).read().decode()
    assert re.search(r"^License-File: LICENSE$", pkg_info, re.M)
    assert re.search(r"^Requires-Python: >=3\.10$", pkg_info, re.M)
    for name in ("CHANGELOG.rst", "README.rst", "noxfile.py", "examples/Dockerfile",
                 "examples/kubernetes.yaml", "examples/logrotate.conf",
                 "twisted/plugins/spoon_plugin.py", "spoon/server.py"):
        assert "%s/%s" % (top, name) in names, name
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_wheel_holds_spoon_and_the_plugin_only(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        dist_info = [n for n in names if ".dist-info/" in n]
        entry_points = zf.read([n for n in dist_info if n.endswith("entry_points.txt")][0])
        metadata = zf.read([n for n in dist_info if n.endswith("/METADATA")][0]).decode()
    under_twisted = [n for n in names if n.startswith("twisted/")]
    # Nothing of Twisted's own: no twisted/__init__.py, no twisted/plugins/__init__.py, no
    # dropin.cache; uninstalling must not be able to delete any of them.
    assert under_twisted == ["twisted/plugins/spoon_plugin.py"]
    top = {n.split("/")[0] for n in names}
    assert top == {"spoon", "twisted", dist_info[0].split("/")[0]}
    spoon_files = {n for n in names if n.startswith("spoon/")}
    for module in ("__init__", "server", "greenio", "daemon", "logs", "examples"):
        assert "spoon/%s.py" % module in spoon_files
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert re.search(rb"^spoon = spoon\.daemon:main$", entry_points, re.M)
    assert "Provides-Extra: sentry" in metadata


def _drop_file_override():
    """In the child, before exec: give up root's power to write files it has no write
    permission for (CAP_DAC_OVERRIDE), so a read-only file is read-only for it too."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _twistd_plugins(venv, read_only=False):
    """Run the venv's ``twistd --help``; return (exit status, plugin names listed, output).

    ``read_only``: run it unable to write files without write permission, even as root.
    """
    result = subprocess.run(
        [os.path.join(venv, "bin", "twistd"), "--help"],
        capture_output=True, text=True, timeout=120, cwd=venv,
        preexec_fn=_drop_file_override if read_only and os.geteuid() == 0 else None,
        stdin=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
    )
    names = set()
    in_commands = False
    for line in result.stdout.splitlines():
        if line.startswith("Commands:"):
            in_commands = True
            continue
        match = re.match(r"^\s+(\S+)\s{2,}\S", line)
        if in_commands and match:
            names.add(match.group(1))
    return result.returncode, names, result.stdout + result.stderr


def test_scratch_venv_install_and_uninstall(wheel, tmp_path):
    """SLOW (~10 s): real install, twistd, stale and read-only dropin.cache, uninstall."""
    venv = str(tmp_path / "venv")
    try:
        subprocess.run(
            [sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120,
            capture_output=True,
        )
        python = os.path.join(venv, "bin", "python")
        with zipfile.ZipFile(wheel) as zf:
            metadata = zf.read(
                [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")][0]
            ).decode()
        requirements = [
            line.split(":", 1)[1].strip()
            for line in metadata.splitlines()
            if line.startswith("Requires-Dist:") and "extra ==" not in line
        ]
        assert any(r.lower().startswith("twisted") for r in requirements)
        _pip("install", "-q", *requirements, python=python)
        site = subprocess.run(
            [python, "-c", "import twisted, os; print(os.path.dirname(twisted.__file__))"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout.strip()
        assert site.startswith(venv)
        plugins_dir = os.path.join(site, "plugins")
        cache = os.path.join(plugins_dir, "dropin.cache")
        twisted_own = [
            os.path.join(site, "__init__.py"),
            os.path.join(plugins_dir, "__init__.py"),
            os.path.join(plugins_dir, "twisted_web.py"),
        ]

        # A cache written before spoon is installed (stale once it is).
        status, names, output = _twistd_plugins(venv)
        assert status == 0, output
        assert "web" in names and "spoon" not in names
        assert os.path.exists(cache)

        _pip("install", "-q", "--no-deps", wheel, python=python)
        assert os.path.exists(os.path.join(plugins_dir, "spoon_plugin.py"))
        status, names, output = _twistd_plugins(venv)
        assert status == 0, output
        assert "spoon" in names and "web" in names

        # A corrupt cache is rebuilt.
        with open(cache, "wb") as f:
            f.write(b"this is not a pickle")
        status, names, output = _twistd_plugins(venv)
        assert status == 0, output
        assert "spoon" in names

        # A corrupt cache that twistd cannot rewrite (a read-only plugins directory, as in
        # a system-wide install run by another user).
        with open(cache, "wb") as f:
            f.write(b"corrupt again")
        os.chmod(cache, 0o444)
        os.chmod(plugins_dir, 0o555)
        try:
            status, names, output = _twistd_plugins(venv, read_only=True)
        finally:
            os.chmod(plugins_dir, 0o755)
            os.chmod(cache, 0o644)
        assert status == 0, output
        assert "spoon" in names
        with open(cache, "rb") as f:
            assert f.read() == b"corrupt again"  # it really could not write

        # The console script and the module entry point of the installed copy.
        for command in ([os.path.join(venv, "bin", "spoon"), "--help"],
                        [python, "-m", "spoon.daemon", "--help"]):
            result = subprocess.run(command, capture_output=True, text=True, timeout=60,
                                    cwd=venv, stdin=subprocess.DEVNULL)
            assert result.returncode == 0, result.stderr
            assert "{start,stop,reload,restart,status,upgrade}" in result.stdout

        _pip("uninstall", "-y", "-q", "spoon", python=python)
        assert not os.path.exists(os.path.join(plugins_dir, "spoon_plugin.py"))
        assert not os.path.exists(os.path.join(os.path.dirname(site), "spoon"))
        for path in twisted_own:
            assert os.path.exists(path), path
        status, names, output = _twistd_plugins(venv)
        assert status == 0, output
        assert "web" in names and "spoon" not in names
        result = subprocess.run(
            [python, "-c", "import twisted.web, twisted.plugins.twisted_web"],
            capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0, result.stderr
    finally:
        shutil.rmtree(venv, ignore_errors=True)
