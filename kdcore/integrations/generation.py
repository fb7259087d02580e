"""Continuing the prompts of a training batch with a model's own generations, for the methods
that train on generated text (sequence-level KD: the teacher's outputs; on-policy KD: the
student's; reasoning distillation: the teacher's rationales and answers).

Batches follow the engine's language-modelling layout: ``inputs["input_ids"] [B, L]`` (with an
optional ``attention_mask``) and ``labels [B, L]`` aligned with the logits (``labels[:, i]`` is
the token after position ``i``; the ignore index on prompt and padding positions). A row's prompt
is its input tokens up to and including the first position that has a label, so the first
labelled token is the first one the prompt is continued with; a row with no label at all is all
prompt (its attended tokens) and gets no continuation.

Generation uses the model's ``generate`` (Hugging Face ``GenerationMixin``, with its key/value
cache) on left-padded prompts; the result is laid out again right-padded: the prompt, then the
generated tokens up to and including the first end-of-sequence token, with labels on the
generated tokens only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from kdcore.engine.data import Batch


@dataclass(frozen=True)
class GenerationOptions:
    """How continuations are drawn. ``do_sample=False`` is greedy decoding (beam search with
    ``num_beams > 1``); sampling draws from the full distribution at ``temperature`` (no top-k),
    restricted to the ``top_p`` nucleus when below 1. ``eos_token_id`` ends a continuation (the
    model's generation config's when None; no end token at all when the model has none)."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_beams: int = 1
    eos_token_id: int | None = None

    def check(self, method: str) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"{method}: max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if not self.temperature > 0:
            raise ValueError(f"{method}: the generation temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"{method}: top_p must lie in (0, 1], got {self.top_p}")
        if isinstance(self.num_beams, bool) or not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise ValueError(f"{method}: num_beams must be a positive int, got {self.num_beams!r}")


def prompt_lengths(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                   ignore_index: int) -> torch.Tensor:
    """The prompt length of each row (see the module docstring)."""
    labelled = labels != ignore_index
    first = labelled.int().argmax(1)
    return torch.where(labelled.any(1), first + 1, attention_mask.sum(1)).long()


def require_generate(model: nn.Module, method: str):
    """``model.generate``; a model without one raises ``TypeError`` naming it. Methods call this in
    ``setup`` so that a model that cannot generate stops the run before training."""
    generate = getattr(model, "generate", None)
    if not callable(generate):
        raise TypeError(f"{method}: {type(model).__name__} has no generate(); generation-based methods need a "
                        "Hugging Face causal LM (model: hf_causal_lm)")
    return generate


def continue_prompts(model: nn.Module, batch: Batch, ignore_index: int, options: GenerationOptions, *,
                     method: str) -> Batch:
    """``batch`` with each row's prompt continued by ``model`` (run in eval mode under no_grad,
    then restored to its mode), labelled for training on the continuation. The new batch is on the
    model's device."""
    generate = require_generate(model, method)
    if not isinstance(batch.inputs, Mapping) or "input_ids" not in batch.inputs or batch.labels is None:
        raise ValueError(f"{method}: batches must hold input_ids (and labels marking the prompt with the ignore "
                         "index); got " + (f"inputs {sorted(batch.inputs)}" if isinstance(batch.inputs, Mapping)
                                           else f"{type(batch.inputs).__name__} inputs"))
    extra = sorted(set(batch.inputs) - {"input_ids", "attention_mask"})
    if extra:
        raise ValueError(f"{method}: generated batches carry only input_ids and attention_mask; the dataset also "
                         f"gives {extra}")
    device = next(model.parameters()).device
    input_ids = batch.inputs["input_ids"].to(device)
    attention_mask = batch.inputs.get("attention_mask")
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    labels = batch.labels.to(device)
    if input_ids.dim() != 2 or labels.shape != input_ids.shape:
        raise ValueError(f"{method}: input_ids and labels must both be [batch, length], got "
                         f"{tuple(input_ids.shape)} and {tuple(labels.shape)}")
    lengths = prompt_lengths(input_ids, attention_mask, labels, ignore_index)
    config = model.generation_config
    eos = options.eos_token_id if options.eos_token_id is not None else _first(config.eos_token_id)
    pad = _first(config.pad_token_id)
    pad = pad if pad is not None else (eos if eos is not None else 0)

    longest = int(lengths.max())
    prompts = torch.full((len(input_ids), longest), pad, dtype=input_ids.dtype, device=device)
    prompt_mask = torch.zeros_like(prompts)
    for row, length in enumerate(lengths.tolist()):  # left-padded, as decoder-only generation needs
        prompts[row, longest - length:] = input_ids[row, :length]
        prompt_mask[row, longest - length:] = 1
    sampling = dict(do_sample=True, temperature=options.temperature, top_p=options.top_p, top_k=0) \
        if options.do_sample else dict(do_sample=False)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            generated = generate(input_ids=prompts, attention_mask=prompt_mask, max_new_tokens=options.max_new_tokens,
                                 min_new_tokens=0, num_beams=options.num_beams, pad_token_id=pad, eos_token_id=eos,
                                 synced_gpus=_sharded_over_processes(model), **sampling)
    finally:
        model.train(was_training)
    continuations = generated[:, longest:]

    rows = []
    for row, length in enumerate(lengths.tolist()):
        new = continuations[row] if labels[row].ne(ignore_index).any() else continuations[row, :0]
        if eos is not None:
            ends = (new == eos).nonzero()
            if len(ends):
                new = new[: int(ends[0]) + 1]
        rows.append((input_ids[row, :length], new))
    width = max(len(prompt) + len(new) for prompt, new in rows) - 1
    out_ids = torch.full((len(rows), width), pad, dtype=input_ids.dtype, device=device)
    out_mask = torch.zeros_like(out_ids)
    out_labels = torch.full_like(out_ids, ignore_index)
    for row, (prompt, new) in enumerate(rows):
        tokens = torch.cat([prompt, new])
        out_ids[row, : len(tokens) - 1] = tokens[:-1]
        out_mask[row, : len(tokens) - 1] = 1
        out_labels[row, len(prompt) - 1: len(tokens) - 1] = new
    return Batch({"input_ids": out_ids, "attention_mask": out_mask}, out_labels)


def _sharded_over_processes(model: nn.Module) -> bool:
    """Whether ``model`` is sharded (FSDP) over several processes: each of its forward passes then
    gathers parameters from all of them, so every process must run as many generation steps as
    the longest (what ``synced_gpus`` does) even when its own rows all ended."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    if torch.distributed.get_world_size() == 1:
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


def _first(token_id: int | list[int] | None) -> int | None:
    """A generation config's token id (which may be a list of alternatives) as one id."""
    if isinstance(token_id, (list, tuple)):
        return token_id[0] if token_id else None
    return token_id
