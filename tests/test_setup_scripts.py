"""The setup scripts' own logic: which Debian mirror debootstrap uses, the venv they make and
reuse, and which tests the core suite (pytest --core) leaves out."""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")


def run(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(SCRIPTS, script), *args], capture_output=True, text=True, timeout=50, check=False,
                          stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})


def archive(path: Path, origin: str) -> str:
    """A directory that answers like an apt archive serving bookworm, for a file:// URI."""
    os.makedirs(path / "dists" / "bookworm")
    (path / "dists" / "bookworm" / "Release").write_text(f"Origin: {origin}\nSuite: oldstable\n")
    return f"file://{path}"


def machine(tmp_path: Path, os_id: str, sources: dict | None = None, sources_list: str | None = None) -> str:
    root = tmp_path / "root"
    os.makedirs(root / "etc" / "apt" / "sources.list.d")
    (root / "etc" / "os-release").write_text(f"ID={os_id}\nVERSION_CODENAME={'bookworm' if os_id == 'debian' else 'noble'}\n")
    for name, text in (sources or {}).items():
        (root / "etc" / "apt" / "sources.list.d" / name).write_text(text)
    if sources_list is not None:
        (root / "etc" / "apt" / "sources.list").write_text(sources_list)
    return str(root)


def test_debootstrap_mirror_is_the_machines_own_debian_archive(tmp_path):
    mirror = archive(tmp_path / "mirror", "Debian")
    vendor = archive(tmp_path / "vendor", "Vendor")  # a third-party repository naming the same suite
    root = machine(tmp_path, "debian", sources={
        "a-vendor.sources": f"Types: deb\nURIs: {vendor}\nSuites: bookworm\nComponents: main\n",
        "b-off.sources": f"Enabled: no\nTypes: deb\nURIs: {archive(tmp_path / 'off', 'Debian')}\nSuites: bookworm\n"
                         "Components: main\n",
        "debian.sources": f"Types: deb\n# a comment inside the stanza\nURIs: {mirror}/\nSuites: bookworm\n"
                          " bookworm-updates\nComponents: main\n\nTypes: deb\nURIs: file:///nowhere\n"
                          "Suites: bookworm-security\nComponents: main\n"})
    done = run("debian-mirror.sh", root)
    assert (done.returncode, done.stdout) == (0, f"{mirror}\n"), done.stderr


def test_debootstrap_mirror_from_a_one_line_sources_list(tmp_path):
    mirror = archive(tmp_path / "mirror", "Debian")
    root = machine(tmp_path, "debian", sources_list=f"# deb file:///commented bookworm main\n"
                                                   f"deb [signed-by=/k.gpg] {mirror}/ bookworm main contrib\n")
    assert run("debian-mirror.sh", root).stdout == f"{mirror}\n"


def test_no_debian_archive_is_a_clear_error_unless_one_is_named(tmp_path):
    ubuntu = archive(tmp_path / "ubuntu", "Ubuntu")
    root = machine(tmp_path, "ubuntu", sources={"ubuntu.sources": f"Types: deb\nURIs: {ubuntu}\nSuites: noble\nComponents: main\n"})
    done = run("debian-mirror.sh", root)
    assert done.returncode == 1 and done.stdout == "" and "ARSERVICE_DEBIAN_MIRROR" in done.stderr
    named = run("debian-mirror.sh", root, env={"ARSERVICE_DEBIAN_MIRROR": "http://mirror.example/debian"})
    assert named.stdout == "http://mirror.example/debian\n"


def test_a_python_older_than_3_10_is_refused(tmp_path):
    old = tmp_path / "python3.9"
    old.write_text('#!/bin/sh\n[ "$1" = -V ] && echo "Python 3.9.18" || exit 1\n')
    old.chmod(0o755)
    done = run("venv.sh", str(tmp_path / "venv"), str(old))
    assert done.returncode == 1 and "is Python 3.9.18; arservice needs Python 3.10 or later" in done.stderr
    assert not (tmp_path / "venv").exists()


def test_a_broken_venv_is_remade_and_a_working_one_reused(tmp_path):
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / "pyvenv.cfg").write_text("home = /gone\n")  # as after its base Python was removed
    made = run("venv.sh", str(venv), sys.executable)
    assert made.returncode == 0 and "remaking" in made.stderr, made.stderr
    assert subprocess.run([venv / "bin" / "python", "-m", "pip", "--version"], capture_output=True, check=False).returncode == 0
    config = (venv / "pyvenv.cfg").stat().st_mtime_ns
    again = run("venv.sh", str(venv), sys.executable)
    assert (again.returncode, again.stderr) == (0, "")
    assert (venv / "pyvenv.cfg").stat().st_mtime_ns == config


def collected(*args: str) -> list[str]:
    nowhere = "unix:///nonexistent/arservice-test.sock"  # collection need not ask the engines for images
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=50, check=False,
                          env={**os.environ, "DOCKER_HOST": nowhere, "CONTAINER_HOST": nowhere})
    return [line for line in done.stdout.splitlines() if "::" in line]


def test_the_core_suite_leaves_out_exactly_the_tests_that_need_a_daemon():
    # Three collections of the whole suite, at once: each is mostly imports, seconds on a busy machine.
    with ThreadPoolExecutor() as pool:
        every, core, daemons = pool.map(lambda option: collected(*option), ((), ("--core",), ("--daemons",)))
    assert set(core) < set(every)
    assert "tests/test_environments.py::test_exit_codes_and_merged_output[local]" in core
    assert "tests/test_lifecycle.py::test_token_guards_every_endpoint_but_health" in core
    left_out = set(every) - set(core)
    # CI runs the full suite as --core beside --daemons: together, every test once.
    assert len(daemons) == len(set(daemons)) and set(daemons) == left_out
    assert "tests/test_environments.py::test_exit_codes_and_merged_output[docker-busybox]" in left_out
    assert "tests/test_environments.py::test_long_commands_hold_no_worker_thread[bubblewrap]" in left_out
    assert not [t for t in core if t.split("::")[0] in ("tests/test_containers.py", "tests/test_bubblewrap.py",
                                                        "tests/test_slurm.py")]


def test_setup_without_the_system_installs_test_and_lint_once_and_refuses_unknown_options(tmp_path):
    """--no-system, and a user that is not root, get the test and lint extras, pip only once (the
    stamp), and nothing of the system; an unknown option or a second one is a usage error, where
    it ran the full setup. The venv is this Python behind a wrapper that records pip's installs
    (setup.sh's choices are under test; venv.sh is tested above). setup.sh is shown a user that
    is not root and an apt-get that fails, so that nothing here can reach the system."""
    calls = tmp_path / "pip-calls"
    shims = tmp_path / "shims"
    shims.mkdir()
    for name, script in (("id", "echo 1000"), ("apt-get", "echo apt-get called >&2; exit 1")):
        (shims / name).write_text(f"#!/bin/sh\n{script}\n")
        (shims / name).chmod(0o755)
    user = {"PATH": f"{shims}{os.pathsep}{os.environ['PATH']}"}
    for options in (["--no-system"], []):
        venv = tmp_path / ("venv" + "".join(options))
        (venv / "bin").mkdir(parents=True)
        (venv / "pyvenv.cfg").write_text(f"home = {os.path.dirname(sys.executable)}\n")  # venv.sh reuses it
        python = venv / "bin" / "python"
        python.write_text(f'#!/bin/sh\n[ "$1 $2 $3" = "-m pip install" ] && {{ echo "$*" >>{calls}; exit 0; }}\n'
                          f'exec {sys.executable} "$@"\n')
        python.chmod(0o755)
        done = run("setup.sh", *options, env={**user, "ARSERVICE_VENV": str(venv)})
        assert done.returncode == 0, done.stderr
        assert calls.read_text().splitlines()[-1].endswith("-e .[test,lint]")
        again = run("setup.sh", *options, env={**user, "ARSERVICE_VENV": str(venv)})  # the stamp: no pip the second time
        assert again.returncode == 0 and "pip install" not in again.stderr, again.stderr
    assert len(calls.read_text().splitlines()) == 2
    for wrong in (["--no-sytem"], ["--no-system", "--no-system"]):
        refused = run("setup.sh", *wrong, env={**user, "ARSERVICE_VENV": str(tmp_path / "untouched")})
        assert refused.returncode == 2 and "usage: scripts/setup.sh [--no-system]" in refused.stderr
    assert not (tmp_path / "untouched").exists()
