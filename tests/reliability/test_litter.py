"""Litter and half-written files: SIGTERM/SIGINT clean up what a command was writing; SIGKILL
leaves temporaries that the next run removes; a full disk leaves no empty or partial file."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import stat
from pathlib import Path

import pytest

from latentrt.bundle.writer import atomic_write
from latentrt.cli.main import main


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_export_interrupted_cleans_up(tiny_sd3_dir, tmp_path, run_stopped, sig):
    out = tmp_path / "out"
    child = run_stopped(r"^writing bundle ", "cli", "export", tiny_sd3_dir, "-o", out)
    assert _temporaries(tmp_path)  # the temporary bundle exists while it runs
    child.proc.send_signal(sig)
    code, err = child.resume()
    assert code == (143 if sig == signal.SIGTERM else 130), err
    assert ("terminated" if sig == signal.SIGTERM else "interrupted") in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_export_killed_leaves_a_temporary_that_the_next_run_removes(tiny_sd3_dir, tmp_path, run_stopped, capsys):
    out = tmp_path / "out"
    child = run_stopped(r"^writing bundle ", "cli", "export", tiny_sd3_dir, "-o", out)
    assert child.kill() == -9
    (left,) = _temporaries(tmp_path)
    assert left.startswith(".out.tmp-") and not out.exists()
    (tmp_path / ".other.tmp-1-abcdefgh").mkdir()  # not ours for this output: kept
    assert main(["export", "no-such-source", "-o", str(out)]) == 2
    assert "neither a built-in preset" in capsys.readouterr().err
    assert _temporaries(tmp_path) == [".other.tmp-1-abcdefgh"] and not out.exists()


def test_generate_killed_while_writing_its_image(tiny_sd3_bundle, tmp_path, run_stopped, run_cli):
    image = tmp_path / "x.png"
    child = run_stopped(r"^writing .*x\.png through ", "cli", "-vv", "generate", tiny_sd3_bundle, "-p", "a cat", "--steps", "1",
                        "--height", "64", "--width", "64", "-o", image)
    assert child.kill() == -9
    (left,) = _temporaries(tmp_path)
    assert left.startswith(".x.png.") and left.endswith(".tmp") and not image.exists()
    done = run_cli("generate", tiny_sd3_bundle, "-p", "a cat", "--steps", "1", "--height", "64", "--width", "64", "-o", image)
    assert done.returncode == 0, done.stderr
    assert _temporaries(tmp_path) == [] and image.stat().st_size > 0


def test_atomic_write_keeps_a_live_writers_temporary_and_sets_permissions(tmp_path):
    target = tmp_path / "engine.bin"
    live = tmp_path / ".engine.bin.abcdefgh.tmp"
    stale = tmp_path / ".engine.bin.zyxwvuts.tmp"
    live.write_bytes(b"being written")
    stale.write_bytes(b"left by a killed writer")
    with open(live, "rb") as held:  # another open file description holding the lock, as a live writer does
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        atomic_write(target, b"data")
    assert target.read_bytes() == b"data"
    assert live.exists() and not stale.exists()
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_generate_onto_a_full_disk_leaves_no_file(tiny_sd3_bundle, tmp_path, in_tmpfs, shell_cli, tmpfs_listing):
    mnt = tmp_path / "mnt"
    result = in_tmpfs(mnt, "8k", shell_cli("generate", tiny_sd3_bundle, "-p", "a cat", "--steps", "1", "--height", "256",
                                           "--width", "256", "-o", mnt / "x.png"))
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not write") and "the disk is full" in last and "Traceback" not in result.stderr
    assert tmpfs_listing(result) == []


def test_export_onto_a_too_small_disk_is_refused_before_writing(tiny_sd3_dir, tmp_path, in_tmpfs, shell_cli, tmpfs_listing):
    mnt = tmp_path / "mnt"
    result = in_tmpfs(mnt, "1m", shell_cli("export", tiny_sd3_dir, "-o", mnt / "bundle"))
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the bundle needs about 3.3 MB for its weights") and "MB free" in last, last
    assert "Traceback" not in result.stderr and tmpfs_listing(result) == []


def test_export_onto_a_disk_that_fills_up_leaves_nothing(tiny_sd3_dir, tmp_path, in_tmpfs, shell_cli, tmpfs_listing):
    """Room for the weights (the check up front passes), not for the whole bundle."""
    weights = sum(f.stat().st_size for f in Path(tiny_sd3_dir).rglob("*.safetensors"))
    mnt = tmp_path / "mnt"
    result = in_tmpfs(mnt, f"{weights // 1024 + 64}k", shell_cli("export", tiny_sd3_dir, "-o", mnt / "bundle"))
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not write") and "the disk is full" in last and "Traceback" not in result.stderr
    assert tmpfs_listing(result) == []


@pytest.mark.parametrize("command", ["export", "generate"])
def test_read_only_output_folder(tiny_sd3_dir, tiny_sd3_bundle, tmp_path, in_tmpfs, shell_cli, tmpfs_listing, command):
    mnt = tmp_path / "mnt"
    argv = ("export", tiny_sd3_dir, "-o", mnt / "b") if command == "export" else ("generate", tiny_sd3_bundle, "-p", "x", "-o", mnt / "x.png")
    result = in_tmpfs(mnt, "1m", shell_cli(*argv), read_only=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [f"error: cannot write {argv[-1]}: no write permission on {mnt} (or it is read-only); choose another "
                                                  + ("path" if command == "export" else "folder")]
    assert tmpfs_listing(result) == []


def test_calibrate_killed_leaves_nothing_after_the_next_run(tiny_sd3_bundle, tmp_path, run_stopped):
    out = tmp_path / "int8"
    child = run_stopped(r"^writing bundle ", "cli", "calibrate", tiny_sd3_bundle, "-o", out, "--precision", "int8",
                        "--num-prompts", "1", "--steps", "1")
    assert child.kill() == -9
    assert len(_temporaries(tmp_path)) == 1
    shutil.rmtree(tmp_path / "unrelated", ignore_errors=True)
    assert main(["calibrate", str(tiny_sd3_bundle), "-o", str(out), "--precision", "int8", "--num-prompts", "1", "--steps", "1"]) == 0
    assert _temporaries(tmp_path) == [] and (out / "manifest.json").is_file()
