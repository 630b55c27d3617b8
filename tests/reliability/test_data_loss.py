"""Data loss: an output that is, contains or lies inside an input is refused before anything is
written, and replacing a bundle leaves, at every instant, either the old or the new bundle at the
output path, even when the writing process is killed (SIGKILL) between the steps of the swap."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from latentrt.bundle.manifest import load_manifest
from latentrt.bundle.writer import writing_bundle
from latentrt.cli.main import main
from latentrt.errors import InputError


def _digest(root: Path) -> str:
    """One hash over every file's relative path and bytes."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name or p.name.endswith(".tmp"))


@pytest.fixture
def source(tiny_sd3_dir, tmp_path):
    return shutil.copytree(tiny_sd3_dir, tmp_path / "parent" / "src")


@pytest.mark.parametrize(
    "output,relation",
    [("{src}", "is the source pipeline"), ("{parent}", "contains the source pipeline"), ("{src}/bundle", "lies inside the source pipeline")],
)
def test_export_refuses_an_output_overlapping_its_source(source, capsys, output, relation):
    before = _digest(source.parent)
    out = output.format(src=source, parent=source.parent)
    assert main(["export", str(source), "-o", out, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and relation in err and err.count("\n") == 1
    assert _digest(source.parent) == before


def test_export_refuses_an_output_that_links_to_its_source(source, capsys):
    link = source.parent.parent / "link"
    link.symlink_to(source)
    before = _digest(source)
    assert main(["export", str(source), "-o", str(link), "--overwrite"]) == 2
    assert "is the source pipeline" in capsys.readouterr().err
    assert _digest(source) == before


@pytest.mark.parametrize("output", ["{bundle}", "{parent}", "{bundle}/int8"])
def test_calibrate_refuses_an_output_overlapping_its_input(tiny_sd3_bundle, tmp_path, capsys, output):
    bundle = shutil.copytree(tiny_sd3_bundle, tmp_path / "parent" / "bundle")
    before = _digest(bundle.parent)
    out = output.format(bundle=bundle, parent=bundle.parent)
    assert main(["calibrate", str(bundle), "-o", out, "--precision", "int8", "--num-prompts", "1", "--steps", "1", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "the input bundle" in err and err.count("\n") == 1
    assert _digest(bundle.parent) == before


def test_generate_and_eval_refuse_outputs_inside_the_bundle(tiny_sd3_bundle, tmp_path, capsys):
    bundle = shutil.copytree(tiny_sd3_bundle, tmp_path / "bundle")
    before = _digest(bundle)
    assert main(["generate", str(bundle), "-p", "x", "--steps", "1", "-o", str(bundle / "onnx" / "x.png")]) == 2
    assert "lies inside the bundle" in capsys.readouterr().err
    assert main(["eval", str(bundle), "--steps", "1", "--json", str(bundle / "manifest.json")]) == 2
    assert "lies inside the bundle" in capsys.readouterr().err
    assert _digest(bundle) == before


@pytest.fixture
def old_and_new(tiny_sd3_bundle, tmp_path):
    """An existing bundle at `out` (marked old) and a different complete bundle to replace it with."""
    out = shutil.copytree(tiny_sd3_bundle, tmp_path / "out")
    (out / "generation.txt").write_text("old")
    new = shutil.copytree(tiny_sd3_bundle, tmp_path / "new")
    (new / "generation.txt").write_text("new")
    return out, new


def _holds(out: Path) -> str:
    load_manifest(out)  # complete: every file present and matching its sha256
    return (out / "generation.txt").read_text()


def test_killed_just_before_the_swap_the_old_bundle_is_there(old_and_new, run_stopped):
    out, new = old_and_new
    child = run_stopped(r"^replacing .* with ", "copy", new, out)
    assert child.kill() == -9
    assert _holds(out) == "old"
    assert _leftovers(out.parent)  # the new bundle, complete but never swapped in
    with writing_bundle(out, overwrite=True) as tmp:  # the next write removes it
        shutil.copytree(new, tmp, dirs_exist_ok=True)
    assert _holds(out) == "new" and _leftovers(out.parent) == []


def test_killed_just_after_the_swap_the_new_bundle_is_there(old_and_new, run_stopped):
    out, new = old_and_new
    child = run_stopped(r" is in place; removing the previous bundle ", "copy", new, out)
    assert child.kill() == -9
    assert _holds(out) == "new"
    assert len(_leftovers(out.parent)) == 1  # the old bundle under the temporary name
    assert main(["export", "no-such-source", "-o", str(out), "--overwrite"]) == 2  # any later write cleans up
    assert _holds(out) == "new" and _leftovers(out.parent) == []


def test_two_renames_killed_between_them_are_repaired_by_the_next_run(old_and_new, run_stopped, capsys):
    """Where RENAME_EXCHANGE is missing the swap is two renames; killed between them, the output is
    briefly missing and the old bundle sits under `.out.old-*`: the next run puts it back."""
    out, new = old_and_new
    child = run_stopped(r"^moved the old bundle ", "copy", new, out, "--two-renames")
    assert child.kill() == -9
    assert not out.exists()
    assert [name.split("-")[0] for name in _leftovers(out.parent)] == [".out.old", ".out.tmp"]
    assert main(["export", "no-such-source", "-o", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err  # the old bundle is back, so no --overwrite: refused
    assert _holds(out) == "old" and _leftovers(out.parent) == []


def test_two_renames_completed_replace_the_bundle(old_and_new, run_stopped):
    out, new = old_and_new
    child = run_stopped(r"^moved the old bundle ", "copy", new, out, "--two-renames")
    code, err = child.resume()
    assert code == 0, err
    assert _holds(out) == "new" and _leftovers(out.parent) == []


def test_a_bundle_written_meanwhile_is_not_replaced_without_overwrite(tiny_sd3_bundle, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(InputError, match="written by another process meanwhile"):
        with writing_bundle(out) as tmp:
            shutil.copytree(tiny_sd3_bundle, tmp, dirs_exist_ok=True)
            shutil.copytree(tiny_sd3_bundle, out)  # someone else, between our start and our swap
    assert _leftovers(tmp_path) == [] and load_manifest(out)
