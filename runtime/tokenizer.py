"""Prompt tokenization from a bundle's tokenizer.json, padded and truncated the way diffusers does it."""

from __future__ import annotations

import logging
import os
import threading

import numpy as np

from latentrt.errors import BundleError

logger = logging.getLogger(__name__)


class PromptTokenizer:
    """Wraps a `tokenizers.Tokenizer` to produce fixed-length `input_ids`.

    Prompts are padded to the length with `pad_id` and truncated to it (special tokens kept), as
    transformers does with `padding="max_length", truncation=True`. Truncation logs a warning with
    the dropped text, as diffusers does.

    Safe to call from several threads: the truncating tokenizer of each length is its own object,
    made once under a lock and never reconfigured afterwards (a shared one reconfigured per call
    raised "Already borrowed" or truncated one thread's prompts to another thread's length).
    """

    def __init__(self, path: str | os.PathLike, *, max_length: int, pad_id: int) -> None:
        from tokenizers import Tokenizer

        try:
            self._full = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises its own exception types
            raise BundleError(f"{path} is not a valid tokenizer.json ({err}); the bundle is corrupt, re-export it") from err
        self._full.no_padding()
        self._full.no_truncation()
        self._json = self._full.to_str()
        self._truncating: dict[int, object] = {}  # length -> Tokenizer truncating to it
        self._lock = threading.Lock()
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
        truncating = self._truncating_to(length)
        for row, (full, cut) in enumerate(zip(self._full.encode_batch(prompts), truncating.encode_batch(prompts))):
            if len(full.ids) > length:
                tail = sum(1 for _ in _trailing(full.special_tokens_mask))
                dropped = self._full.decode(full.ids[len(cut.ids) - tail : len(full.ids) - tail])
                logger.warning("prompt %d is longer than %d tokens and was truncated; dropped: %r", row, length, dropped)
            ids[row, : len(cut.ids)] = cut.ids
            mask[row, : len(cut.ids)] = 1
        return ids, mask

    def _truncating_to(self, length: int):
        with self._lock:
            tokenizer = self._truncating.get(length)
            if tokenizer is None:
                from tokenizers import Tokenizer

                tokenizer = Tokenizer.from_str(self._json)
                tokenizer.no_padding()
                tokenizer.enable_truncation(length)
                self._truncating[length] = tokenizer
            return tokenizer


def _trailing(mask: list[int]):
    for special in reversed(mask):
        if not special:
            return
        yield special
