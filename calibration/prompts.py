"""Calibration and evaluation prompt lists.

A prompts file holds one prompt per line; blank lines and lines starting with `#` are skipped.
Shipped lists: `prompts/default.txt` (generic captions for calibration) and `prompts/eval.txt`
(held-out captions for quality comparisons, none of them in default.txt). A model trained on its
own captions (the demo model) passes its own list with `--prompts`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from latentrt.errors import InputError
from latentrt.bundle.manifest import Manifest

PROMPTS_DIR = Path(__file__).parent / "prompts"
DEFAULT_PROMPTS = PROMPTS_DIR / "default.txt"
EVAL_PROMPTS = PROMPTS_DIR / "eval.txt"


def load_prompts(path: str | os.PathLike) -> list[str]:
    """Read a prompts file.

    Raises:
        InputError: the file cannot be read as UTF-8 text, or holds no prompt.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read the prompts file {path}: {err}; pass a UTF-8 text file with one prompt per line") from err
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise InputError(f"the prompts file {path} holds no prompt (only blank or '#' lines); put one prompt per line")
    return prompts


def prompts_sha256(prompts: Sequence[str]) -> str:
    """sha256 of the prompts joined by newlines (UTF-8): identifies the calibration set."""
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()


def default_prompts(manifest: Manifest, count: int, *, seed: int = 0) -> list[str]:
    """The first `count` lines of `prompts/default.txt` (cycled if `count` is larger)."""
    prompts = load_prompts(DEFAULT_PROMPTS)
    return [prompts[i % len(prompts)] for i in range(count)]


def select_prompts(prompts: Sequence[str], count: int) -> list[str]:
    """The first `count` prompts (all of them when there are fewer)."""
    return list(prompts[:count])
