"""Helpers of the reliability tests: real processes stopped at a log line and signalled there, a
real small tmpfs (in a private mount namespace) for full-disk and read-only cases."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

CHILD = Path(__file__).with_name("_child.py")
REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Stopped:
    """A child process stopped (SIGSTOP) right after logging a line that matched."""

    def __init__(self, proc: subprocess.Popen, line: str, stderr: list[str]) -> None:
        self.proc, self.line, self._stderr = proc, line, stderr

    def kill(self) -> int:
        self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(timeout=60)

    def terminate(self) -> tuple[int, str]:
        """SIGTERM, then SIGCONT so that the stopped process handles it; returns (exit code, stderr)."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.send_signal(signal.SIGCONT)
        return self.resume()

    def resume(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGCONT)
        out, err = self.proc.communicate(timeout=300)
        return self.proc.returncode, "".join(self._stderr) + err


def stop_at(pattern: str, *argv: str, timeout: float = 300) -> Stopped:
    """Start `_child.py PATTERN ARGV...` and wait until it stopped after the matching log line."""
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), pattern, *map(str, argv)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO,
    )
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    seen: list[str] = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if line.startswith("STOPPED AT:"):
                # The line is written just before the child stops itself: wait until it has stopped,
                # so that a SIGCONT sent next cannot arrive before the SIGSTOP.
                _, status = os.waitpid(proc.pid, os.WUNTRACED)
                assert os.WIFSTOPPED(status), f"the child did not stop after {line!r} (status {status})"
                return Stopped(proc, line, seen)
    finally:
        watchdog.cancel()
    proc.wait()
    raise AssertionError(f"the child exited ({proc.returncode}) without logging {pattern!r}:\n{''.join(seen)[-3000:]}")


def latentrt(*argv: str, timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`latentrt ARGV` in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "latentrt.cli.main", *map(str, argv)],
        capture_output=True, text=True, timeout=timeout, env=_env(), cwd=cwd or REPO,
    )


def _can_mount_tmpfs() -> str | None:
    """None when `unshare -rm` can mount a tmpfs here, else the reason it cannot."""
    if not sys.platform.startswith("linux"):
        return "tmpfs mounts need Linux"
    if shutil.which("unshare") is None:
        return "util-linux `unshare` is not installed"
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d"],
        capture_output=True, text=True,
    )
    if probe.returncode:
        return f"cannot mount a tmpfs in a user+mount namespace here ({probe.stderr.strip() or probe.returncode})"
    return None


@pytest.fixture(scope="session")
def in_tmpfs():
    """`in_tmpfs(mountpoint, size, command, read_only=False)`: run the shell `command` in a private
    mount namespace where `mountpoint` is a fresh tmpfs of `size` (e.g. "2m"), optionally remounted
    read-only first. Skips the test, with the reason, where no tmpfs can be mounted."""
    reason = _can_mount_tmpfs()
    if reason:
        pytest.skip(reason)

    def run(mountpoint: Path, size: str, command: str, *, read_only: bool = False, timeout: float = 600) -> subprocess.CompletedProcess:
        mountpoint.mkdir(parents=True, exist_ok=True)
        ro = f" && mount -o remount,ro {mountpoint}" if read_only else ""
        script = f"mount -t tmpfs -o size={size} tmpfs {mountpoint}{ro} && {command}; rc=$?; echo; echo LISTING; ls -A {mountpoint}; exit $rc"
        return subprocess.run(
            ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
            capture_output=True, text=True, timeout=timeout, env=_env(), cwd=REPO,
        )

    return run


def listing(result: subprocess.CompletedProcess) -> list[str]:
    """What `in_tmpfs` found in the tmpfs after the command."""
    return result.stdout.split("LISTING\n", 1)[1].split()


def python_cmd(*argv: str) -> str:
    """A shell-quoted `python -m latentrt.cli.main ARGV` for `in_tmpfs`."""
    import shlex

    return " ".join(shlex.quote(a) for a in (sys.executable, "-m", "latentrt.cli.main", *map(str, argv)))


@pytest.fixture(scope="session")
def run_stopped():
    """`run_stopped(pattern, *argv)`: see `stop_at`."""
    return stop_at


@pytest.fixture(scope="session")
def run_cli():
    """`run_cli(*argv)`: `latentrt ARGV` in a fresh process (CompletedProcess)."""
    return latentrt


@pytest.fixture(scope="session")
def shell_cli():
    """`shell_cli(*argv)`: the shell command line of `latentrt ARGV`, for `in_tmpfs`."""
    return python_cmd


@pytest.fixture(scope="session")
def tmpfs_listing():
    return listing
