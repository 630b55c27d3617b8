"""Real tokenizers built locally, in `tokenizer.json` form, for the tiny presets.

No hub access: a CLIP-style byte-level BPE and a T5-style unigram are trained with the
`tokenizers` library on a small fixed corpus. Both are saved with a `tokenizer_config.json`
that `transformers.PreTrainedTokenizerFast.from_pretrained` loads, which is what diffusers'
pipelines call.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

_ADJECTIVES = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "small", "large", "big", "tiny"]
_NOUNS = ["cat", "dog", "circle", "square", "triangle", "house", "tree", "car", "mountain", "river", "city", "robot"]
_PLACES = ["on the left", "on the right", "at the top", "at the bottom", "in the centre", "at night", "in the snow"]


def caption_corpus() -> list[str]:
    """A few hundred deterministic captions that cover the presets' prompts."""
    return [
        f"a photo of a {adj} {noun} {place}"
        for adj, noun, place in itertools.product(_ADJECTIVES, _NOUNS, _PLACES)
    ]


def clip_bpe(vocab_size: int = 1000, max_length: int = 77) -> tuple[Tokenizer, dict]:
    """A CLIP-style byte-level BPE: lowercased, `<|startoftext|>` ... `<|endoftext|>`, padded with the end token."""
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[bos, eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(caption_corpus(), trainer=trainer)
    bos_id, eos_id = tok.token_to_id(bos), tok.token_to_id(eos)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} $B {eos}", special_tokens=[(bos, bos_id), (eos, eos_id)]
    )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": eos,
        "unk_token": eos,
        "clean_up_tokenization_spaces": False,
    }
    return tok, config


def t5_unigram(vocab_size: int = 1000, max_length: int = 512) -> tuple[Tokenizer, dict]:
    """A T5-style SentencePiece unigram (Metaspace), `<pad>`=0, `</s>`=1, `<unk>`=2, `</s>` appended."""
    pad, eos, unk = "<pad>", "</s>", "<unk>"
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" {2,}", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=[pad, eos, unk], unk_token=unk, show_progress=False
    )
    tok.train_from_iterator(caption_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, tok.token_to_id(eos))]
    )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        "eos_token": eos,
        "pad_token": pad,
        "unk_token": unk,
        "clean_up_tokenization_spaces": False,
    }
    return tok, config


def save_tokenizer(tok: Tokenizer, config: dict, directory: str | os.PathLike) -> None:
    """Write `tokenizer.json` and `tokenizer_config.json` into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
