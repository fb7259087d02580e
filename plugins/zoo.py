"""Small models and synthetic datasets that need no download, for demos, tests and trying a
method out in seconds.

Models:

* ``mlp``: ``in_features -> hidden... -> num_classes``, ReLU (and optional dropout) between;
  submodules ``body.<i>`` and ``head`` can be tapped.
* ``cnn``: ``[N, in_channels, H, W]`` images through 3×3 conv-BN-ReLU blocks (``blocks.<i>``, one
  per entry of ``channels``; ``stride: 2`` from the second block on halves the map), global average
  pooling and a linear ``head``: the spatial feature maps feature-based methods transfer.
* ``tiny_lm``: a next-token model over ``vocab_size`` tokens (embedding, one residual MLP block,
  output head) that takes ``input_ids [B, L]`` and returns logits ``[B, L, V]``.

Datasets (each returns seeded, reproducible ``train`` / ``val`` splits):

* ``digits``: the UCI handwritten digits (1,797 8×8 images, 10 classes; shipped in
  ``kdcore_plugins/data``, see its README), pixels scaled to [0, 1] as 64 features (or
  ``[1, 8, 8]`` images with ``images: true``): ``val_fraction`` of every class is held out, and
  ``train_fraction`` of the rest trained on (a smaller labelled budget; the held-out split and the
  examples kept do not depend on it beyond their count).

* ``synthetic_classification``: Gaussian inputs labelled by a fixed random two-layer network, a
  task a wide model learns better than a narrow one (so distillation has something to transfer);
  ``label_noise`` flips that fraction of training labels.
* ``synthetic_tokens``: sequences from a random sparse Markov chain (each token has a few likely
  successors); items are ``{"input_ids", "labels"}`` with the labels shifted by one and the
  padding after each sequence's random length labelled ``-100``.
* ``text``: byte-level language modelling (256 tokens, one per byte) on the text file at ``path``,
  by default the Shakespeare shipped in ``kdcore_plugins/data`` (``max_bytes`` keeps only the
  beginning). The last ``val_fraction`` of the text is held
  out; both parts are cut into windows of ``seq_len + 1`` bytes (``stride`` apart, default
  ``seq_len``), items ``{"input_ids", "labels"}`` with the labels shifted by one. With
  ``prompt_len`` P, each window's first P bytes are a prompt: the labels of the P - 1 positions
  before the first predicted byte are ``-100`` (generation-based methods continue the prompt).
  ``train_fraction`` keeps that fraction of the training windows, the same ones for every seed
  and whatever ``prompt_len`` (a student with less text than its teacher saw).
* ``aligned_text``: the same text in windows of ``window_chars`` characters, tokenized by the
  student's tokenizer and, when the teacher names another, by the teacher's, the two aligned (see
  :class:`kdcore.cross_tokenizer.dataset.AlignedTexts`): for distilling across tokenizers
  (``cross_tokenizer_kd``) and for scoring any tokenizer by per-byte perplexity. The tokenizers
  come from the models' ``tokenizer`` keys (kdcore ships ``shakespeare-bpe-1024`` and
  ``shakespeare-unigram-512``, trained on the training part of the Shakespeare).
  ``train_fraction`` keeps that fraction of the training windows (the same ones for every seed): a
  student with less text than its teacher saw.
"""

from __future__ import annotations

import gzip
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import kdcore


class MLP(nn.Module):
    def __init__(self, in_features: int, num_classes: int, hidden: list[int] | tuple[int, ...] = (64,),
                 dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class CNN(nn.Module):
    def __init__(self, num_classes: int, channels: list[int] | tuple[int, ...] = (16, 32), in_channels: int = 1,
                 stride: int = 1) -> None:
        super().__init__()
        blocks, width = [], in_channels
        for index, size in enumerate(channels):
            blocks.append(nn.Sequential(
                nn.Conv2d(width, size, 3, stride=stride if index else 1, padding=1, bias=False),
                nn.BatchNorm2d(size), nn.ReLU()))
            width = size
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean((2, 3)))


class TinyLM(nn.Module):
    def __init__(self, vocab_size: int, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.block = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids)
        return self.head(hidden + self.block(hidden))


def hf_causal_lm(**options):
    """kdcore.integrations.transformers.causal_lm, imported when a config asks for it (transformers
    is an optional extra)."""
    from kdcore.integrations.transformers import causal_lm

    return causal_lm(**options)


class _Tokens(Dataset):
    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor) -> None:
        self.input_ids, self.labels = input_ids, labels

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}


def text(path: str | None = None, seq_len: int = 128, stride: int | None = None, prompt_len: int = 0,
         val_fraction: float = 0.1, train_fraction: float = 1.0, max_bytes: int | None = None) -> dict[str, Dataset]:
    if path is None:
        with resources.files("kdcore_plugins").joinpath("data/shakespeare.txt.gz").open("rb") as handle:
            data = gzip.decompress(handle.read())
    else:
        data = Path(path).read_bytes()
    data = data[:max_bytes]
    stride = seq_len if stride is None else stride
    if seq_len < 1 or stride < 1 or not 0 <= prompt_len <= seq_len or not 0 < val_fraction < 1 \
            or not 0 < train_fraction <= 1:
        raise ValueError(f"text: need seq_len >= 1, stride >= 1, 0 <= prompt_len <= seq_len, 0 < val_fraction < 1 "
                         f"and 0 < train_fraction <= 1; got seq_len={seq_len}, stride={stride}, "
                         f"prompt_len={prompt_len}, val_fraction={val_fraction}, train_fraction={train_fraction}")
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    split = round(len(tokens) * (1 - val_fraction))

    def windows(part: torch.Tensor, fraction: float = 1.0) -> _Tokens:
        if len(part) < seq_len + 1:
            raise ValueError(f"text: a split of {len(part)} bytes is shorter than one window of seq_len + 1 = "
                             f"{seq_len + 1}")
        chunks = part.unfold(0, seq_len + 1, stride)
        if fraction < 1:  # the same windows whatever the run's seed
            keep = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(0))
            chunks = chunks[keep[:max(1, round(fraction * len(chunks)))].sort().values]
        labels = chunks[:, 1:].clone()
        labels[:, :max(prompt_len - 1, 0)] = -100
        return _Tokens(chunks[:, :-1].contiguous(), labels)

    return {"train": windows(tokens[:split], train_fraction), "val": windows(tokens[split:])}


def aligned_text(tokenizers: dict, path: str | None = None, window_chars: int = 512, stride_chars: int | None = None,
                 student_length: int = 256, teacher_length: int = 256, prompt_chars: int = 0,
                 val_fraction: float = 0.1, train_fraction: float = 1.0, max_chars: int | None = None) -> dict[str, Dataset]:
    from kdcore.cross_tokenizer.dataset import AlignedTexts

    if "student" not in tokenizers:
        raise ValueError("aligned_text: name the student's tokenizer (student.tokenizer: a tokenizer.json, a directory "
                         "holding one, or shakespeare-bpe-1024 / shakespeare-unigram-512) and, to distil across "
                         "tokenizers, the teacher's (teachers.0.tokenizer)")
    stride_chars = window_chars if stride_chars is None else stride_chars
    if window_chars < 1 or stride_chars < 1 or not 0 <= prompt_chars < window_chars or not 0 < val_fraction < 1 \
            or not 0 < train_fraction <= 1:
        raise ValueError(f"aligned_text: need window_chars >= 1, stride_chars >= 1, 0 <= prompt_chars < window_chars, "
                         f"0 < val_fraction < 1 and 0 < train_fraction <= 1; got window_chars={window_chars}, "
                         f"stride_chars={stride_chars}, prompt_chars={prompt_chars}, val_fraction={val_fraction}, "
                         f"train_fraction={train_fraction}")
    if path is None:
        with resources.files("kdcore_plugins").joinpath("data/shakespeare.txt.gz").open("rb") as handle:
            data = gzip.decompress(handle.read()).decode()
    else:
        try:
            data = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"aligned_text: cannot read path={path!r} as UTF-8 text: {exc}") from None
    data = data[:max_chars]
    split = round(len(data) * (1 - val_fraction))
    options = dict(student_length=student_length, teacher_length=teacher_length, prompt_chars=prompt_chars)

    def windows(part: str, fraction: float = 1.0) -> Dataset:
        texts = [part[start:start + window_chars] for start in range(0, len(part) - window_chars + 1, stride_chars)]
        if not texts:
            raise ValueError(f"aligned_text: a split of {len(part)} characters is shorter than one window of "
                             f"window_chars = {window_chars}")
        if fraction < 1:  # the same windows whatever the run's seed
            keep = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0))[:max(1, round(fraction * len(texts)))]
            texts = [texts[i] for i in sorted(keep.tolist())]
        return AlignedTexts(texts, tokenizers["student"], tokenizers.get("teacher0"), **options)

    return {"train": windows(data[:split], train_fraction), "val": windows(data[split:])}


def digits(val_fraction: float = 0.25, train_fraction: float = 1.0, images: bool = False,
           seed: int = 0) -> dict[str, Dataset]:
    with resources.files("kdcore_plugins").joinpath("data/digits.csv.gz").open("rb") as handle:
        table = np.loadtxt(gzip.open(handle), delimiter=",", dtype=np.float32)
    inputs = torch.from_numpy(table[:, :-1] / 16.0)
    labels = torch.from_numpy(table[:, -1]).long()
    if images:
        inputs = inputs.reshape(-1, 1, 8, 8)
    generator = torch.Generator().manual_seed(seed)
    held_out = torch.zeros(len(labels), dtype=torch.bool)
    train = torch.zeros(len(labels), dtype=torch.bool)
    for digit in range(10):  # the same fractions of every class
        members = (labels == digit).nonzero()[:, 0]
        order = members[torch.randperm(len(members), generator=generator)]
        val_count = round(val_fraction * len(members))
        held_out[order[:val_count]] = True
        train[order[val_count:val_count + round(train_fraction * (len(members) - val_count))]] = True
    return {"train": TensorDataset(inputs[train], labels[train]),
            "val": TensorDataset(inputs[held_out], labels[held_out])}


def synthetic_classification(features: int = 32, num_classes: int = 10, train_size: int = 2048,
                             val_size: int = 512, label_noise: float = 0.0, seed: int = 0) -> dict[str, Dataset]:
    generator = torch.Generator().manual_seed(seed)
    oracle_hidden = torch.randn(features, 4 * features, generator=generator) / features ** 0.5
    oracle_out = torch.randn(4 * features, num_classes, generator=generator) / (4 * features) ** 0.5
    inputs = torch.randn(train_size + val_size, features, generator=generator)
    labels = (torch.tanh(inputs @ oracle_hidden) @ oracle_out).argmax(-1)
    flip = torch.rand(train_size, generator=generator) < label_noise
    labels[:train_size][flip] = torch.randint(num_classes, (int(flip.sum()),), generator=generator)
    return {"train": TensorDataset(inputs[:train_size], labels[:train_size]),
            "val": TensorDataset(inputs[train_size:], labels[train_size:])}


def synthetic_tokens(vocab_size: int = 64, seq_len: int = 32, train_size: int = 1024, val_size: int = 256,
                     successors: int = 3, min_len: int = 8, seed: int = 0) -> dict[str, Dataset]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.full((vocab_size, vocab_size), -4.0)
    likely = torch.randint(vocab_size, (vocab_size, successors), generator=generator)
    logits.scatter_(1, likely, torch.rand(vocab_size, successors, generator=generator) * 3 + 1)
    transition = logits.softmax(-1)
    count = train_size + val_size
    tokens = torch.empty(count, seq_len + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(vocab_size, (count,), generator=generator)
    for position in range(seq_len):
        tokens[:, position + 1] = torch.multinomial(transition[tokens[:, position]], 1, generator=generator)[:, 0]
    lengths = torch.randint(min_len, seq_len + 1, (count,), generator=generator)
    padding = torch.arange(seq_len) >= lengths[:, None]
    input_ids = tokens[:, :-1].masked_fill(padding, 0)
    labels = tokens[:, 1:].masked_fill(padding, -100)
    return {"train": _Tokens(input_ids[:train_size], labels[:train_size]),
            "val": _Tokens(input_ids[train_size:], labels[train_size:])}


@kdcore.hookimpl
def kdcore_register_models(register):
    register("mlp", MLP, description="multi-layer perceptron: in_features, num_classes, hidden, dropout")
    register("cnn", CNN, description="conv-BN-ReLU blocks, global pooling, linear head: num_classes, channels, "
                                     "in_channels, stride")
    register("tiny_lm", TinyLM, description="next-token model over input_ids: vocab_size, dim")
    register("hf_causal_lm", hf_causal_lm, description="a Hugging Face causal LM (kdcore[transformers]): model_type "
                                                       "and its config keys, or pretrained")


@kdcore.hookimpl
def kdcore_register_datasets(register):
    register("digits", digits, description="UCI handwritten digits, 8x8, 10 classes (ships with kdcore)")
    register("synthetic_classification", synthetic_classification,
             description="Gaussian inputs labelled by a random 2-layer network (no download)")
    register("synthetic_tokens", synthetic_tokens,
             description="token sequences from a random sparse Markov chain, padded, labels shifted (no download)")
    register("text", text, description="byte-level language modelling on a text file (default: Shakespeare, "
                                       "ships with kdcore), optional prompts")
    register("aligned_text", aligned_text,  # without a teacher tokenizer: the student's side alone
             description="a text file (default: Shakespeare) tokenized by the student's tokenizer and the teacher's, "
                         "aligned; ships shakespeare-bpe-1024 and shakespeare-unigram-512")
