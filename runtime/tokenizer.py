"""Prompt tokenization from a bundle's tokenizer.json, padded and truncated the way diffusers does it."""

from __future__ import annotations

import logging
import os

import numpy as np

logger = logging.getLogger(__name__)


class PromptTokenizer:
    """Wraps a `tokenizers.Tokenizer` to produce fixed-length `input_ids`.

    Prompts are padded to the length with `pad_id` and truncated to it (special tokens kept), as
    transformers does with `padding="max_length", truncation=True`. Truncation logs a warning with
    the dropped text, as diffusers does.
    """

    def __init__(self, path: str | os.PathLike, *, max_length: int, pad_id: int) -> None:
        from tokenizers import Tokenizer

        self._full = Tokenizer.from_file(str(path))
        self._full.no_padding()
        self._full.no_truncation()
        self._truncating = Tokenizer.from_file(str(path))
        self._truncating.no_padding()
        self.max_length = max_length
        self.pad_id = pad_id

    def __call__(self, prompts: list[str], max_length: int | None = None) -> np.ndarray:
        """Token ids [len(prompts), length] int64, `length` = `max_length` or the tokenizer's default."""
        return self.with_mask(prompts, max_length)[0]

    def with_mask(self, prompts: list[str], max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and the attention mask (1 for tokens, 0 for padding), both [len(prompts), length] int64."""
        length = self.max_length if max_length is None else max_length
        ids = np.full((len(prompts), length), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(prompts), length), dtype=np.int64)
        if length == 0:
            return ids, mask
        self._truncating.enable_truncation(length)
        for row, (full, cut) in enumerate(zip(self._full.encode_batch(prompts), self._truncating.encode_batch(prompts))):
            if len(full.ids) > length:
                tail = sum(1 for _ in _trailing(full.special_tokens_mask))
                dropped = self._full.decode(full.ids[len(cut.ids) - tail : len(full.ids) - tail])
                logger.warning("prompt %d is longer than %d tokens and was truncated; dropped: %r", row, length, dropped)
            ids[row, : len(cut.ids)] = cut.ids
            mask[row, : len(cut.ids)] = 1
        return ids, mask


def _trailing(mask: list[int]):
    for special in reversed(mask):
        if not special:
            return
        yield special
