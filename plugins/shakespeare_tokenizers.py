"""The two tokenizers that ship with kdcore, trained on the shipped Shakespeare, for distilling
between models that do not share a tokenizer (not a plugin itself: it registers nothing).

* ``shakespeare-bpe-1024``: byte-level BPE as GPT-2 and Llama 3 have it (``Ġ`` marks a space,
  every byte is a token, nothing is unknown), 1,024 tokens, ``<|endoftext|>`` first in every
  sequence;
* ``shakespeare-unigram-512``: a SentencePiece-style unigram model as T5 and many multilingual
  models have it (``▁`` marks a space and is prepended to the text), 512 tokens, ``<s>`` first in
  every sequence.

Both learn from the training part of the text only (the first 90%, as the ``text`` and
``aligned_text`` datasets split it). Training is deterministic; ``python -m
kdcore_plugins.shakespeare_tokenizers`` writes the files again, and a test checks they come out
the same.
"""

from __future__ import annotations

import gzip
import sys
from importlib import resources
from pathlib import Path

TOKENIZERS = {"shakespeare-bpe-1024": ("bpe", 1024), "shakespeare-unigram-512": ("unigram", 512)}
TRAIN_FRACTION = 0.9


def shakespeare_text() -> str:
    with resources.files("kdcore_plugins").joinpath("data/shakespeare.txt.gz").open("rb") as handle:
        return gzip.decompress(handle.read()).decode()


def train(name: str):
    """The tokenizer ``name`` (a key of ``TOKENIZERS``), trained afresh."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    kind, size = TOKENIZERS[name]
    text = shakespeare_text()
    corpus = text[:round(len(text) * TRAIN_FRACTION)].split("\n\n")  # speeches
    if kind == "bpe":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=["<|endoftext|>"], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        first = "<|endoftext|>"
    else:
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = trainers.UnigramTrainer(vocab_size=size, special_tokens=["<s>", "<unk>"], unk_token="<unk>",
                                          show_progress=False)
        first = "<s>"
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{first} $A",
                                                             special_tokens=[(first, tokenizer.token_to_id(first))])
    return tokenizer


def main(folder: str | None = None) -> None:
    target = Path(folder) if folder else Path(str(resources.files("kdcore_plugins").joinpath("data/tokenizers")))
    target.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZERS:
        train(name).save(str(target / f"{name}.json"))
        print(f"wrote {target / f'{name}.json'}")


if __name__ == "__main__":
    main(*sys.argv[1:])
