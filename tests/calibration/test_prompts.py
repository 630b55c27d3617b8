"""Prompt lists: file parsing and the shipped defaults."""

from __future__ import annotations


from latentrt.calibration.prompts import DEFAULT_PROMPTS, EVAL_PROMPTS, default_prompts, load_prompts, prompts_sha256
from latentrt.bundle.manifest import load_manifest


def test_load_prompts_skips_blank_and_comment_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# header\n a red circle \n\nblue square\n")
    assert load_prompts(path) == ["a red circle", "blue square"]
    import hashlib

    assert prompts_sha256(["a", "b"]) == hashlib.sha256(b"a\nb").hexdigest()


def test_eval_prompts_are_held_out():
    default, held_out = load_prompts(DEFAULT_PROMPTS), load_prompts(EVAL_PROMPTS)
    assert len(default) == 64 and len(held_out) == 16
    assert not set(default) & set(held_out)


def test_default_prompts(tiny_sd3_bundle):
    manifest = load_manifest(tiny_sd3_bundle, verify=False)
    assert default_prompts(manifest, 3) == load_prompts(DEFAULT_PROMPTS)[:3]
    assert len(default_prompts(manifest, 70)) == 70  # the list is cycled
