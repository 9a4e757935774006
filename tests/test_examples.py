"""The deployment files in ``examples/`` do what README's "Deploying" says, run for real.

- ``Dockerfile``: its ``CMD`` (with a free port on loopback) runs as PID 1 of a new PID
  namespace, as in a container (``unshare --pid``, root only); SIGTERM sent from outside,
  as ``docker stop`` sends it, lets a request in flight finish, then the pool exits 0.
  No image is built: that needs a Docker daemon and a base image from a registry; its
  ``COPY`` lines are done into a scratch directory and what they copied is built into a
  wheel, as its ``pip install`` would.
- ``kubernetes.yaml``: a Deployment and a Service whose grace period outlasts the pool's
  ``graceful_timeout``, with a preStop hook, on the port the image serves.  Parsed with
  PyYAML when it is installed, else checked line by line.
- ``logrotate.conf``: its rotation (move, ``create``) applied to the log file of a real
  pre-forked ``spoon`` daemon; the master and every worker then write to the new file.
  Real ``logrotate`` runs the configuration when it is installed; else the test does what
  the configuration tells logrotate to do.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import zipfile

import pytest

from support import ROOT, children_of, connect, pid_alive, recv_all, wait_for

EXAMPLES = os.path.join(ROOT, "examples")
BIN = os.path.dirname(sys.executable)


def _read(name):
    with open(os.path.join(EXAMPLES, name)) as f:
        return f.read()


def dockerfile_command():
    """The exec-form ``CMD`` of examples/Dockerfile, as a list."""
    [line] = [l for l in _read("Dockerfile").splitlines() if l.startswith("CMD ")]
    return json.loads(line[4:])


def _option(argv, flag, value):
    """``argv`` with the value after ``flag`` replaced."""
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


def _stop_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _can_unshare_pid():
    unshare = shutil.which("unshare")
    if not unshare or os.geteuid() != 0:
        return False
    result = subprocess.run([unshare, "--pid", "--fork", "--mount-proc", "true"],
                            capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    return result.returncode == 0


def _listen_queue(port):
    """Connections waiting in the accept queue of the listening socket on ``port``, or
    None when nothing listens there (from /proc/net/tcp: rx_queue of the LISTEN entry)."""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port:
                return int(fields[4].split(":")[1], 16)
    return None


def test_dockerfile_command_as_pid_1_finishes_the_request_in_flight_on_term(tmp_path):
    if not _can_unshare_pid():
        pytest.skip("needs root and unshare --pid to run the command as PID 1")
    argv = dockerfile_command()
    assert argv[:2] == ["spoon", "spoon.examples.EchoServerForked"]
    argv = _option(_option(argv, "-P", "0"), "-I", "127.0.0.1")
    argv[0] = os.path.join(BIN, argv[0])
    err = tmp_path / "stderr"
    with open(err, "wb") as out:
        proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", *argv], stdout=out, stderr=out,
            stdin=subprocess.DEVNULL, start_new_session=True, cwd=str(tmp_path),
        )
    try:
        started = re.compile(r"Starting \S+ on 127\.0\.0\.1:(\d+) \(pid (\d+), 2 workers\)")
        wait_for(lambda: proc.poll() is not None or started.search(err.read_text()),
                 timeout=30, what="the pool to start")
        match = started.search(err.read_text())
        assert match, "exit status %s: %s" % (proc.poll(), err.read_text())
        port, inner_pid = int(match.group(1)), int(match.group(2))
        assert inner_pid == 1  # PID 1 of its namespace, as in a container
        [pool] = wait_for(lambda: children_of(proc.pid), what="unshare's child")
        wait_for(lambda: len(children_of(pool)) == 2, timeout=30, what="two workers")

        with connect(("127.0.0.1", port), timeout=30) as client:
            client.sendall(b"Hello ")  # the handler waits for the rest of the line
            wait_for(lambda: _listen_queue(port) == 0, what="a worker to accept")
            os.kill(pool, signal.SIGTERM)  # from outside the namespace, as docker stop does
            # Both workers drain...
            wait_for(lambda: err.read_text().count("SIGTERM received") == 2, timeout=20,
                     what="both workers to start their graceful stop")
            assert "Graceful stop of 2 worker(s)" in err.read_text()
            # ... no new connection is taken (its SYN is dropped until the socket closes)...
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            # ... and the request in flight is finished.
            client.sendall(b"World\n")
            assert recv_all(client) == b"hello world\n"
        assert proc.wait(timeout=40) == 0, err.read_text()
        assert not pid_alive(pool)
    finally:
        _stop_group(proc)


def test_dockerfile_copies_everything_building_spoon_needs(tmp_path):
    """The image's ``COPY`` lines, done into a scratch root, then its ``pip install`` source
    built into a wheel that holds the package and the twistd plugin."""
    root = tmp_path / "image"
    for line in _read("Dockerfile").splitlines():
        if not line.startswith("COPY "):
            continue
        *sources, dest = line.split()[1:]
        target = root / dest.lstrip("/")
        for name in sources:
            source = os.path.join(ROOT, name)
            if os.path.isdir(source):
                shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy(source, target / name)
    [install] = [l for l in _read("Dockerfile").splitlines() if "pip install" in l]
    source_dir = re.search(r"pip install --no-cache-dir (\S+)", install).group(1)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "wheel", "-q", "--no-deps",
         "-w", str(tmp_path / "out"), str(root / source_dir.lstrip("/"))],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    [wheel] = os.listdir(tmp_path / "out")
    with zipfile.ZipFile(tmp_path / "out" / wheel) as zf:
        names = zf.namelist()
    for name in ("spoon/server.py", "spoon/daemon.py", "twisted/plugins/spoon_plugin.py"):
        assert name in names


def test_readme_shows_the_command_the_image_runs():
    with open(os.path.join(ROOT, "README.rst")) as f:
        readme = f.read()
    assert "\n        %s\n" % " ".join(dockerfile_command()) in readme


# -- Kubernetes ------------------------------------------------------------------------------


def _kubernetes_documents():
    text = _read("kubernetes.yaml")
    try:
        import yaml
    except ImportError:
        return None, text
    return [d for d in yaml.safe_load_all(text) if d], text


def test_kubernetes_grace_period_outlasts_graceful_timeout_with_a_prestop_hook():
    from spoon.examples import EchoServerForked

    image_port = int(dockerfile_command()[dockerfile_command().index("-P") + 1])
    documents, text = _kubernetes_documents()
    if documents is None:
        # No PyYAML: the same facts, read line by line.
        assert re.findall(r"^kind: (\w+)$", text, re.M) == ["Deployment", "Service"]
        [grace] = re.findall(r"^\s+terminationGracePeriodSeconds: (\d+)$", text, re.M)
        assert re.search(r"^\s+preStop:\n\s+exec:\n\s+command: \[", text, re.M)
        ports = [int(p) for p in re.findall(r"(?:containerPort|targetPort): (\d+)$", text, re.M)]
        assert ports and set(ports) == {image_port}
        assert "\t" not in text
    else:
        kinds = {d["kind"]: d for d in documents}
        assert sorted(kinds) == ["Deployment", "Service"]
        deployment, service = kinds["Deployment"], kinds["Service"]
        template = deployment["spec"]["template"]
        pod = template["spec"]
        grace = pod["terminationGracePeriodSeconds"]
        [container] = pod["containers"]
        assert container["lifecycle"]["preStop"]["exec"]["command"]
        assert [p["containerPort"] for p in container["ports"]] == [image_port]
        assert container["readinessProbe"]["tcpSocket"]["port"] == image_port
        labels = template["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert service["spec"]["selector"].items() <= labels.items()
        assert [p["targetPort"] for p in service["spec"]["ports"]] == [image_port]
    pre_stop = re.search(r"sleep\W+(\d+)", text)
    pre_stop_seconds = int(pre_stop.group(1)) if pre_stop else 0
    # The grace period covers the preStop pause and then the whole graceful stop.
    assert int(grace) > pre_stop_seconds + EchoServerForked.graceful_timeout


# -- logrotate -------------------------------------------------------------------------------


def _logrotate_config(log_file):
    """examples/logrotate.conf for ``log_file`` instead of the example's path."""
    text = _read("logrotate.conf")
    [path] = re.findall(r"^(/\S+) \{$", text, re.M)
    return text.replace(path, log_file)


def _rotate_as_logrotate_would(config, log_file, state):
    """Run ``config`` with real logrotate when installed, else do what it says: rename the
    file to ``.1`` and create a new one (``create [MODE [OWNER GROUP]]``), then run
    ``postrotate`` if there is one."""
    logrotate = shutil.which("logrotate") or (
        "/usr/sbin/logrotate" if os.path.exists("/usr/sbin/logrotate") else None)
    conf = state + ".conf"
    with open(conf, "w") as f:
        f.write(config)
    if logrotate:
        result = subprocess.run([logrotate, "--force", "--state", state, conf],
                                capture_output=True, text=True, timeout=60,
                                stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stdout + result.stderr
        return "logrotate"
    body = config.split("{", 1)[1]
    assert "copytruncate" not in body
    os.rename(log_file, log_file + ".1")
    create = re.search(r"^\s+create(?: (\d+)(?: (\S+) (\S+))?)?$", body, re.M)
    assert create, "the example creates the new file"
    old = os.stat(log_file + ".1")
    with open(log_file, "w"):
        pass
    # "create" alone: the old file's mode and owner.
    os.chmod(log_file, int(create.group(1), 8) if create.group(1) else old.st_mode & 0o7777)
    if not create.group(2):
        os.chown(log_file, old.st_uid, old.st_gid)
    script = re.search(r"postrotate\n(.*?)\n\s*endscript", body, re.S)
    if script:
        subprocess.run(["sh", "-c", script.group(1)], check=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    return "emulated"


def _pids_writing(path, text):
    with open(path) as f:
        return {int(m.group(1)) for m in re.finditer(r"^\S+ \S+ \[(\d+)\] .*%s" % re.escape(text),
                                                     f.read(), re.M)}


def test_logrotate_example_leaves_the_master_and_every_worker_writing_the_new_file(tmp_path):
    log_file, pid_file = str(tmp_path / "echo.log"), str(tmp_path / "echo.pid")
    spoon = [os.path.join(BIN, "spoon"), "spoon.examples.EchoServerForked"]
    start = subprocess.run(
        spoon + ["start", "-p", pid_file, "-L", log_file, "-P", "0", "-I", "127.0.0.1",
                 "-n", "0"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert start.returncode == 0, start.stderr
    with open(pid_file) as f:
        master = int(f.read())
    try:
        workers = wait_for(lambda: (lambda kids: kids if len(kids) == 2 else None)(
            children_of(master)), timeout=30, what="two workers")
        how = _rotate_as_logrotate_would(_logrotate_config(log_file), log_file,
                                         str(tmp_path / "state"))
        assert os.path.exists(log_file + ".1"), how
        # Something for every process to log after the rotation: a reload.
        assert subprocess.run(spoon + ["reload", "-p", pid_file], timeout=60,
                              capture_output=True).returncode == 0
        wait_for(lambda: _pids_writing(log_file, "SIGUSR1 received") == set(workers),
                 timeout=20, what="every worker logging to the new file")
        wait_for(lambda: master in _pids_writing(log_file, "Reloading configuration in"),
                 timeout=20, what="the master logging to the new file")
        assert not _pids_writing(log_file + ".1", "SIGUSR1 received")
        assert "Starting spoon.examples.EchoServerForked" in open(log_file + ".1").read()
    finally:
        subprocess.run(spoon + ["stop", "-p", pid_file, "--stop-timeout", "40"], timeout=60,
                       capture_output=True)
        if pid_alive(master):
            os.kill(master, signal.SIGKILL)
