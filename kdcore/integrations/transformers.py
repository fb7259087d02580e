"""Distilling Hugging Face causal language models (``transformers`` is an optional extra:
``pip install kdcore[transformers]``).

- :func:`causal_lm_kd_loss`: the token-level distillation loss of a student ``PreTrainedModel``
  against a teacher model (or a :class:`kdcore.SparseTeacher`, e.g. from a teacher-logit cache) on
  one batch of ``input_ids`` / ``attention_mask`` / ``labels`` in Hugging Face's convention (labels
  are the input ids, ``-100`` on prompt and padding tokens; the shift to next-token targets happens
  here). With ``fused=True`` neither model's ``[tokens, vocab]`` logits are materialized: the loss
  runs on the models' last hidden states and LM heads through :func:`kdcore.fused_linear_kd_loss`.
- :class:`KDTrainer`: a ``transformers.Trainer`` whose loss is ``causal_lm_kd_loss`` (plus the
  usual cross-entropy, weighted), for people who stay in Trainer. It divides by Trainer's count
  of the step's target tokens, so gradient accumulation gives the full-batch gradient.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

import kdcore
from kdcore.sparse import SparseTeacher

try:
    import transformers
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("kdcore.integrations.transformers needs transformers: pip install kdcore[transformers]") from exc

def causal_lm(model_type: str | None = None, pretrained: str | None = None, **config: Any):
    """A causal-LM ``PreTrainedModel``: ``from_pretrained(pretrained)`` (a local directory, or a hub
    id where the network allows), or a fresh model of ``model_type`` (``"gpt2"``, ``"llama"``, ...)
    built from ``config`` (its ``PretrainedConfig`` keys: ``vocab_size``, ``n_layer``, ...). Run
    configs name it as the model ``hf_causal_lm`` with these options."""
    if (model_type is None) == (pretrained is None):
        raise TypeError("hf_causal_lm: give exactly one of model_type (a fresh model from config keys) or "
                        "pretrained (a checkpoint directory or hub id)")
    if pretrained is not None:
        return transformers.AutoModelForCausalLM.from_pretrained(pretrained, **config)
    try:
        model_config = transformers.AutoConfig.for_model(model_type, **config)
    except ValueError as exc:
        raise TypeError(f"hf_causal_lm: {exc}") from None
    return transformers.AutoModelForCausalLM.from_config(model_config)


KD_OPTIONS = ("divergence", "temperature", "beta", "alpha", "t2_scale", "kd_weight", "ce_weight", "sparse_mode",
              "vocab_size", "backend")


def hidden_states_and_head(model, head_owner, inputs: Mapping[str, torch.Tensor]):
    """(last hidden states after the final norm ``[B, L, D]``, LM head weight, bias) of a causal LM
    on ``inputs``, without its ``[B, L, V]`` logits: ``model`` (the model, or its DDP wrapper) runs
    with ``output_hidden_states=True`` and ``logits_to_keep=1``, and ``head_owner`` (the unwrapped
    model) gives the head. The one position of logits the model still returns must equal the head
    applied to the last hidden state, which refuses models that transform their logits (soft
    capping, scaling) and so cannot be fused."""
    head = head_owner.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"fused distillation: {type(head_owner).__name__}'s output embeddings are "
                         f"{type(head).__name__}, not a Linear LM head; use fused=False")
    out = model(**inputs, output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1]
    with torch.no_grad():
        expected = out.logits[:, -1].float()
        if not torch.allclose(head(hidden[:, -1]).float(), expected, rtol=1e-3,
                              atol=1e-3 * float(expected.abs().max().clamp_min(1))):
            raise ValueError(f"fused distillation: {type(head_owner).__name__}'s logits are not its LM head applied to "
                             "its last hidden states (soft capping or scaling?), so they cannot be fused; use "
                             "fused=False")
    return hidden, head.weight, head.bias


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keyword inputs of a causal LM in a Hugging Face batch."""
    return {key: batch[key] for key in ("input_ids", "attention_mask") if batch.get(key) is not None}


def _logits(model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return model(**model_inputs(batch)).logits


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """Hugging Face labels (the input ids, -100 where no loss is wanted) as the target of each
    position: ``labels[:, 1:]``, the positions that predict them being ``[:, :-1]``."""
    return labels[:, 1:]


def causal_lm_kd_loss(student, teacher, batch: Mapping[str, torch.Tensor], *, fused: bool = False,
                      normalizer: float | torch.Tensor | None = None, **options: Any) -> torch.Tensor:
    """The distillation loss of ``student`` (a causal-LM ``PreTrainedModel``) against ``teacher``
    (another, run here under ``no_grad``; or a :class:`SparseTeacher` of shape ``[B, L-1, k]``, one
    entry per predicting position) on ``batch`` (``input_ids``, optional ``attention_mask``,
    ``labels`` with ``-100`` on prompt/padding tokens).

    Only positions whose next-token label is not -100 count: prompt tokens and padding contribute
    nothing, to the divergence or to the cross-entropy (``ce_weight``). ``options`` are
    :func:`kdcore.kd_loss`'s (``divergence``, ``temperature``, ``beta``, ``alpha``, ``t2_scale``,
    ``kd_weight``, ``ce_weight``, ``sparse_mode``, ``vocab_size`` for vocabularies of different
    sizes, ``backend``); the mean is over counted tokens, or ``normalizer``.
    """
    unknown = sorted(set(options) - set(KD_OPTIONS))
    if unknown:
        raise TypeError(f"causal_lm_kd_loss: unknown option(s) {unknown}; choose from {list(KD_OPTIONS)}")
    if "labels" not in batch or "input_ids" not in batch:
        raise ValueError("causal_lm_kd_loss: the batch needs input_ids and labels (Hugging Face's convention: the "
                         "input ids with -100 on prompt and padding tokens)")
    labels = next_token_labels(batch["labels"])
    if isinstance(teacher, torch.nn.Module) and teacher.training:
        raise ValueError("causal_lm_kd_loss: the teacher is in training mode (dropout would perturb its targets); "
                         "call teacher.eval()")
    common = dict(labels=labels, normalizer=normalizer, **options)
    sparse = isinstance(teacher, SparseTeacher)
    if sparse:
        expected = tuple(labels.shape)
        if tuple(teacher.indices.shape[:-1]) != expected:
            raise ValueError(f"causal_lm_kd_loss: the sparse teacher must have one row per predicting position, "
                             f"shape {expected} + (k,), got {tuple(teacher.indices.shape)}")
    if fused:
        hidden, weight, bias = hidden_states_and_head(student, student, model_inputs(batch))
        if sparse:
            return kdcore.fused_linear_kd_loss(hidden[:, :-1], weight, student_bias=bias, teacher=teacher, **common)
        with torch.no_grad():
            t_hidden, t_weight, t_bias = hidden_states_and_head(teacher, teacher, model_inputs(batch))
        return kdcore.fused_linear_kd_loss(hidden[:, :-1], weight, t_hidden[:, :-1], t_weight.detach(),
                                           student_bias=bias, teacher_bias=None if t_bias is None else t_bias.detach(),
                                           **common)
    logits = _logits(student, batch)[:, :-1]
    if sparse:
        return kdcore.kd_loss(logits, teacher=teacher, **common)
    with torch.no_grad():
        teacher_logits = _logits(teacher, batch)[:, :-1]
    return kdcore.kd_loss(logits, teacher_logits, **common)


class KDTrainer(transformers.Trainer):
    """``transformers.Trainer`` training a student against ``teacher`` with
    :func:`causal_lm_kd_loss`. ``kd_options`` are its options (e.g. ``divergence="jsd"``,
    ``temperature=2.0``, ``ce_weight=0.5``, ``fused=True``). The teacher is moved to the student's
    device and kept in eval mode; it is never trained.

    Trainer counts the target tokens of the whole step (``num_items_in_batch``, over every
    accumulated micro-batch and process); the loss divides by it, so the accumulated gradient
    equals the full batch's.
    """

    def __init__(self, *args, teacher, kd_options: Mapping[str, Any] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device).eval()
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        self.kd_options = dict(kd_options or {})
        # Trainer counts the step's target tokens (labels[..., 1:] != -100) only for losses that
        # use the count, and then leaves the loss unscaled for accumulation: this one does.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self.loss_is_scaled_for_ga = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        normalizer = None
        if num_items_in_batch is not None:
            normalizer = torch.as_tensor(num_items_in_batch, dtype=torch.float32).clamp_min(1)
        loss = causal_lm_kd_loss(model, self.teacher, inputs, normalizer=normalizer, **self.kd_options)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # the count is summed over processes and DDP averages their gradients: undo the mean
            loss = loss * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss
