"""Tokenizers, the text each of their tokens stands for, and the tokens two vocabularies share.

kdcore works on Hugging Face ``tokenizers`` (a ``tokenizers.Tokenizer``, or a ``transformers``
fast tokenizer, whose ``backend_tokenizer`` is one): their encodings carry the character offsets
that alignment needs. A token's *text* is the bytes it decodes to, with each family's conventions
undone: byte-level BPE's printable stand-ins for bytes (GPT-2's ``Ġ`` for a space), the
SentencePiece metaspace ``▁`` for a space, and byte-fallback pieces ``<0xNN>``. Two tokens with the
same text are the same token for the shared-vocabulary loss, whichever ids they have.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
#: how shared_vocabulary pairs tokens
VOCABULARY_MODES = ("exact", "projected")


def backend(tokenizer: Any, name: str = "tokenizer"):
    """The ``tokenizers.Tokenizer`` behind ``tokenizer`` (itself, or a fast ``transformers``
    tokenizer's ``backend_tokenizer``); anything else (a slow tokenizer has no offsets) raises
    ``TypeError`` naming ``name``."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    inner = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(inner, Tokenizer):
        return inner
    raise TypeError(f"{name}: expected a tokenizers.Tokenizer or a fast transformers tokenizer (one with offsets), "
                    f"got {type(tokenizer).__name__}; load it with use_fast=True")


def load_tokenizer(spec: str, key: str = "tokenizer"):
    """The tokenizer ``spec`` names: a ``tokenizer.json`` file, a directory holding one (a Hugging
    Face model directory), or the name of a tokenizer that ships with kdcore (``kdcore plugins``
    lists them under the ``aligned_text`` dataset; e.g. ``shakespeare-bpe-1024``)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ValueError(f"{key}: reading tokenizers needs the tokenizers package: pip install "
                         "kdcore[transformers]") from None

    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.exists():
        shipped = shipped_tokenizer_path(spec)
        if shipped is None:
            raise ValueError(f"{key}: {spec!r} is neither a tokenizer.json file, a directory holding one, nor a "
                             f"tokenizer that ships with kdcore ({', '.join(shipped_tokenizers())})")
        path = shipped
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # a truncated or foreign file
        raise ValueError(f"{key}: cannot read {str(path)!r} as a tokenizer: {exc}") from None


def shipped_tokenizers() -> list[str]:
    """The names of the tokenizers that ship with kdcore."""
    folder = resources.files("kdcore_plugins").joinpath("data/tokenizers")
    return sorted(item.name[:-len(".json")] for item in folder.iterdir() if item.name.endswith(".json"))


def shipped_tokenizer_path(name: str) -> Path | None:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name not in shipped_tokenizers():
        return None
    return Path(str(resources.files("kdcore_plugins").joinpath(f"data/tokenizers/{name}.json")))


@lru_cache(maxsize=1)
def _byte_level_table() -> dict[str, int]:
    """GPT-2's map from the printable character standing for a byte back to the byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(256 + extra)] = byte
            extra += 1
    return table


def _decoder_types(config: Any) -> set[str]:
    """Every decoder type named in a tokenizer's JSON decoder section (Sequence included)."""
    if not isinstance(config, dict):
        return set()
    found = {config.get("type")}
    for inner in config.get("decoders") or []:
        found |= _decoder_types(inner)
    return found


def token_texts(tokenizer: Any, name: str = "tokenizer") -> list[bytes | None]:
    """The text (bytes) each token id stands for; ``None`` for special tokens, which stand for no
    text (they are matched across vocabularies by their literal content instead, see
    :func:`shared_vocabulary`)."""
    inner = backend(tokenizer, name)
    config = json.loads(inner.to_str())
    kinds = _decoder_types(config.get("decoder"))
    byte_level = "ByteLevel" in kinds
    metaspace = "Metaspace" in kinds or any(
        d.get("type") == "Replace" and d.get("pattern", {}).get("String") == "▁"
        for d in (config.get("decoder") or {}).get("decoders", []) if isinstance(d, dict))
    byte_fallback = "ByteFallback" in kinds
    wordpiece = "WordPiece" in kinds
    specials = {entry["id"] for entry in config.get("added_tokens", []) if entry.get("special")}
    table = _byte_level_table()
    texts: list[bytes | None] = []
    for index in range(inner.get_vocab_size(with_added_tokens=True)):
        piece = inner.id_to_token(index)
        if piece is None or index in specials:
            texts.append(None)
            continue
        if byte_level:
            # an added (non-special) token is stored as its text, not in byte-level characters
            texts.append(bytes(table[c] for c in piece) if all(c in table for c in piece) else piece.encode())
            continue
        if byte_fallback and (match := _BYTE_PIECE.fullmatch(piece)):
            texts.append(bytes([int(match.group(1), 16)]))
            continue
        if metaspace:
            piece = piece.replace("▁", " ")
        if wordpiece:
            piece = piece[2:] if piece.startswith("##") else piece
        texts.append(piece.encode())
    return texts


def strips_leading_space(tokenizer: Any) -> bool:
    """Whether the tokenizer adds a space before the text that decoding removes (SentencePiece's
    ``▁`` prepended to the first word: a ``Metaspace`` with ``prepend_scheme`` ``first`` or
    ``always``, or a decoder that strips one leading space), so that text rebuilt from its tokens
    must drop it again."""
    config = json.loads(backend(tokenizer).to_str()).get("decoder") or {}
    decoders = config.get("decoders", [config]) if isinstance(config, dict) else []
    for decoder in decoders:
        if not isinstance(decoder, dict):
            continue
        if decoder.get("type") == "Metaspace" and (decoder.get("prepend_scheme") in ("first", "always")
                                                   or decoder.get("add_prefix_space")):
            return True
        if decoder.get("type") == "Strip" and decoder.get("content") == " " and decoder.get("start", 0) >= 1:
            return True
    return False


def special_contents(tokenizer: Any) -> dict[int, str]:
    """Special token id -> its literal content (``"<|endoftext|>"``, ``"<s>"``)."""
    config = json.loads(backend(tokenizer).to_str())
    return {entry["id"]: entry["content"] for entry in config.get("added_tokens", []) if entry.get("special")}


@dataclass(frozen=True)
class SharedVocabulary:
    """A map between two vocabularies for the shared-vocabulary loss: ``student_ids [K]`` (distinct
    student tokens) and ``teacher_ids [M]``, each teacher token counted under the student token
    ``student_ids[teacher_slots[m]]`` (``teacher_slots`` None: one to one, ``M == K``); plus both
    vocabulary sizes. Several teacher tokens may share a slot: their probabilities add."""

    student_ids: torch.Tensor
    teacher_ids: torch.Tensor
    student_size: int
    teacher_size: int
    teacher_slots: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.student_ids)

    def to(self, device: torch.device | str) -> SharedVocabulary:
        slots = None if self.teacher_slots is None else self.teacher_slots.to(device)
        return SharedVocabulary(self.student_ids.to(device), self.teacher_ids.to(device), self.student_size,
                                self.teacher_size, slots)

    @classmethod
    def identity(cls, size: int) -> SharedVocabulary:
        """Every token shared with itself (one tokenizer on both sides)."""
        ids = torch.arange(size)
        return cls(ids, ids.clone(), size, size)

    @classmethod
    def from_pairs(cls, pairs: list[tuple[int, int]], student_size: int, teacher_size: int) -> SharedVocabulary:
        """From ``(student id, teacher id)`` pairs, each teacher id at most once."""
        student_ids = sorted({s for s, _ in pairs})
        slot = {s: i for i, s in enumerate(student_ids)}
        pairs = sorted(pairs, key=lambda pair: pair[1])
        one_to_one = len(student_ids) == len(pairs)
        ordered = sorted(pairs) if one_to_one else pairs
        return cls(torch.tensor(student_ids if not one_to_one else [s for s, _ in ordered], dtype=torch.long),
                   torch.tensor([t for _, t in ordered], dtype=torch.long), student_size, teacher_size,
                   None if one_to_one else torch.tensor([slot[s] for s, _ in ordered], dtype=torch.long))


def shared_vocabulary(student_tokenizer: Any, teacher_tokenizer: Any, mode: str = "exact") -> SharedVocabulary:
    """The map between two vocabularies, by the texts their tokens stand for (each family's
    conventions undone, so GPT-2's ``Ġthe`` meets SentencePiece's ``▁the``); special tokens with
    the same literal content always pair.

    ``mode="exact"``: tokens whose texts are equal, one to one (a text that several ids of one
    vocabulary stand for pairs its lowest id). ``mode="projected"``: every teacher token is counted
    under the student token the student's own model begins that text with (``Ġthere`` under
    ``▁the`` when the student spells " there" as ``▁the`` ``re``), so the teacher's probability of
    every continuation is compared where the student puts it instead of falling into the tail;
    where the student's model cannot segment the text alone (a byte of a character the student
    spells otherwise), the longest student token the text begins with, else the token stays
    unmapped."""
    if mode not in VOCABULARY_MODES:
        raise ValueError(f"shared_vocabulary: mode must be 'exact' or 'projected', got {mode!r}")
    student = _first_id_of_each_text(student_tokenizer, "student_tokenizer")
    student_size = backend(student_tokenizer).get_vocab_size(True)
    teacher_size = backend(teacher_tokenizer).get_vocab_size(True)
    if mode == "exact":
        teacher = _first_id_of_each_text(teacher_tokenizer, "teacher_tokenizer")
        pairs = [(student[key], teacher[key]) for key in student.keys() & teacher.keys()]
        return SharedVocabulary.from_pairs(pairs, student_size, teacher_size)
    pairs = []
    first_token = _first_token_finder(student_tokenizer)
    for index, text in enumerate(token_texts(teacher_tokenizer, "teacher_tokenizer")):
        if text is None:
            continue
        match = first_token(text)
        for length in range(len(text), 0, -1):  # else the longest student token the text begins with
            if match is not None:
                break
            match = student.get(("text", text[:length]))
        if match is not None:
            pairs.append((match, index))
    for index, content in special_contents(teacher_tokenizer).items():
        if ("special", content) in student:
            pairs.append((student[("special", content)], index))
    return SharedVocabulary.from_pairs(pairs, student_size, teacher_size)


def _first_token_finder(tokenizer: Any):
    """``first(text bytes) -> id | None``: the first token of the tokenizer's own segmentation of
    ``text`` as one word (its model run on the text written in the tokenizer's surface form:
    byte-level characters, or ``▁`` for spaces), None where it cannot say (text that is not
    UTF-8, an unknown token, another tokenizer family)."""
    inner = backend(tokenizer)
    config = json.loads(inner.to_str())
    kinds = _decoder_types(config.get("decoder"))
    model = inner.model
    texts = token_texts(tokenizer)  # unknown and special tokens have none
    to_char = {byte: char for char, byte in _byte_level_table().items()}

    def first(text: bytes) -> int | None:
        if "ByteLevel" in kinds:
            surface = "".join(to_char[b] for b in text)
        else:
            try:
                surface = text.decode()
            except UnicodeDecodeError:
                return None
            if "Metaspace" in kinds or "Replace" in kinds:
                surface = surface.replace(" ", "▁")
        pieces = model.tokenize(surface) if surface else []
        if not pieces or not 0 <= pieces[0].id < len(texts) or texts[pieces[0].id] is None:
            return None
        return pieces[0].id

    return first


def _first_id_of_each_text(tokenizer: Any, name: str) -> dict[tuple[str, Any], int]:
    found: dict[tuple[str, Any], int] = {}
    for index, text in enumerate(token_texts(tokenizer, name)):
        if text is not None:
            found.setdefault(("text", text), index)
    for index, content in special_contents(tokenizer).items():
        found.setdefault(("special", content), index)
    return found
