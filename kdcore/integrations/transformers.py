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
  of the step's target tokens, so gradient accumulation gives the full-batch gradient. Under
  accelerate's FSDP2 it shards the teacher for inference as well (docs/scale.md).

Both distil across tokenizers when given ``student_tokenizer`` and ``teacher_tokenizer``: the
batch is the student's (its ``input_ids``, ``labels``), its text is rebuilt from the student's
tokens and tokenized for the teacher, the two are aligned, and the loss is
:func:`kdcore.cross_tokenizer.cross_tokenizer_kd_loss` (``cross_tokenizer`` options: ``loss``,
``vocabulary`` (``"projected"`` or ``"exact"``, see :func:`kdcore.cross_tokenizer.shared_vocabulary`),
``uld_top_k``, ``shared_weight``, ``uld_weight``, ``chunk_size``). :class:`AlignedCollator` does the
re-tokenization and alignment in the DataLoader's workers instead of in the training step.
"""

from __future__ import annotations

import warnings

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
#: options of the cross-tokenizer loss, besides kd_loss's divergence options
CROSS_TOKENIZER_OPTIONS = ("loss", "vocabulary", "uld_top_k", "shared_weight", "uld_weight", "spans", "chunk_size")
#: the batch entries AlignedCollator adds (the teacher's view in the engine's next-token layout)
ALIGNED_KEYS = ("teacher_input_ids", "teacher_attention_mask", "teacher_labels", "student_spans", "teacher_spans")


def hidden_states_and_head(model, head_owner, inputs: Mapping[str, torch.Tensor]):
    """(last hidden states after the final norm ``[B, L, D]``, LM head weight, bias) of a causal LM
    on ``inputs``, without its ``[B, L, V]`` logits: ``model`` (the model, or its DDP wrapper) runs
    with ``output_hidden_states=True`` and ``logits_to_keep=1``, and ``head_owner`` (the unwrapped
    model) gives the head. The one position of logits the model still returns must equal the head
    applied to the last hidden state, which refuses models that transform their logits (soft
    capping, scaling) and so cannot be fused.

    Under FSDP2 ``model`` is the sharded root: the head is read after the forward, while FSDP still
    holds its group gathered (a root, or a group sharded with ``reshard_after_forward=False``, stays
    gathered after its forward), and its gradient is reduce-scattered with the rest."""
    head = head_owner.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"fused distillation: {type(head_owner).__name__}'s output embeddings are "
                         f"{type(head).__name__}, not a Linear LM head; use fused=False")
    with warnings.catch_warnings():  # FSDP2 warns against in-place changes to a root's view output; none is made
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        out = model(**inputs, output_hidden_states=True, logits_to_keep=1)
    if _is_sharded(head.weight):
        raise ValueError(f"fused distillation: {type(head_owner).__name__}'s LM head is sharded again after its "
                         "forward (its FSDP2 group reshards after forward); shard the group holding the head with "
                         "reshard_after_forward=False, or use fused=False")
    hidden = out.hidden_states[-1]
    with torch.no_grad():
        expected = out.logits[:, -1].float()
        if not torch.allclose(head(hidden[:, -1]).float(), expected, rtol=1e-3,
                              atol=1e-3 * float(expected.abs().max().clamp_min(1))):
            raise ValueError(f"fused distillation: {type(head_owner).__name__}'s logits are not its LM head applied to "
                             "its last hidden states (soft capping or scaling?), so they cannot be fused; use "
                             "fused=False")
    return hidden, head.weight, head.bias


def _is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a sharded FSDP2 parameter (a DTensor) rather than a gathered one."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keyword inputs of a causal LM in a Hugging Face batch."""
    return {key: batch[key] for key in ("input_ids", "attention_mask") if batch.get(key) is not None}


def _logits(model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return model(**model_inputs(batch)).logits


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """Hugging Face labels (the input ids, -100 where no loss is wanted) as the target of each
    position, ``[B, L]`` like the input: position i predicts ``labels[:, i + 1]``, and the last
    position, which predicts nothing, gets -100. The labels move rather than the models' outputs
    being cut to ``[:, :-1]``: such a slice of ``[B, L, V]`` logits cannot be flattened to rows
    without copying them (and their gradient), while the whole tensor flattens as a view."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)


def _with_last_position(teacher: SparseTeacher) -> SparseTeacher:
    """A sparse teacher of the predicting positions (``[B, L-1, k]``) extended to all ``L``
    positions, as the shifted labels are: the last position (labelled -100, never counted) gets
    the slots that mark nothing (indices ``0..k-1``, log-probability -inf), as a cache's padding does."""
    batch, _, k = teacher.indices.shape
    indices = torch.arange(k, device=teacher.indices.device).to(teacher.indices.dtype).expand(batch, 1, k)
    logprobs = torch.full((batch, 1, k), -torch.inf, dtype=teacher.logprobs.dtype, device=teacher.logprobs.device)
    return SparseTeacher(torch.cat([teacher.indices, indices], 1), torch.cat([teacher.logprobs, logprobs], 1))


def causal_lm_kd_loss(student, teacher, batch: Mapping[str, torch.Tensor], *, fused: bool = False,
                      normalizer: float | torch.Tensor | None = None, student_tokenizer: Any = None,
                      teacher_tokenizer: Any = None, **options: Any) -> torch.Tensor:
    """The distillation loss of ``student`` (a causal-LM ``PreTrainedModel``) against ``teacher``
    (another, run here under ``no_grad``; or a :class:`SparseTeacher` of shape ``[B, L-1, k]``, one
    entry per predicting position) on ``batch`` (``input_ids``, optional ``attention_mask``,
    ``labels`` with ``-100`` on prompt/padding tokens).

    Only positions whose next-token label is not -100 count: prompt tokens and padding contribute
    nothing, to the divergence or to the cross-entropy (``ce_weight``). ``options`` are
    :func:`kdcore.kd_loss`'s (``divergence``, ``temperature``, ``beta``, ``alpha``, ``t2_scale``,
    ``kd_weight``, ``ce_weight``, ``sparse_mode``, ``vocab_size`` for vocabularies of different
    sizes, ``backend``); the mean is over counted tokens, or ``normalizer``.

    With ``student_tokenizer`` and ``teacher_tokenizer`` (tokenizers with offsets: a
    ``tokenizers.Tokenizer`` or a fast ``transformers`` tokenizer) the teacher reads its own
    tokenization of the batch's text and the loss is the cross-tokenizer one (see the module
    docstring), averaged over the student's counted tokens like the rest; ``ce_weight`` adds the
    student's cross-entropy. The batch may carry the teacher's view already (:class:`AlignedCollator`).
    """
    cross = student_tokenizer is not None or teacher_tokenizer is not None
    allowed = KD_OPTIONS + CROSS_TOKENIZER_OPTIONS if cross else KD_OPTIONS
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"causal_lm_kd_loss: unknown option(s) {unknown}; choose from {list(allowed)}")
    if "labels" not in batch or "input_ids" not in batch:
        raise ValueError("causal_lm_kd_loss: the batch needs input_ids and labels (Hugging Face's convention: the "
                         "input ids with -100 on prompt and padding tokens)")
    labels = next_token_labels(batch["labels"])
    if isinstance(teacher, torch.nn.Module) and teacher.training:
        raise ValueError("causal_lm_kd_loss: the teacher is in training mode (dropout would perturb its targets); "
                         "call teacher.eval()")
    if cross:
        if student_tokenizer is None or teacher_tokenizer is None or isinstance(teacher, SparseTeacher):
            raise ValueError("causal_lm_kd_loss: distilling across tokenizers needs both student_tokenizer and "
                             "teacher_tokenizer, and a teacher model (not a SparseTeacher)")
        return _cross_tokenizer_loss(student, teacher, batch, student_tokenizer, teacher_tokenizer, fused=fused,
                                     normalizer=normalizer, **options)
    common = dict(labels=labels, normalizer=normalizer, **options)
    sparse = isinstance(teacher, SparseTeacher)
    if sparse:
        expected = (labels.shape[0], labels.shape[1] - 1)
        if tuple(teacher.indices.shape[:-1]) != expected:
            raise ValueError(f"causal_lm_kd_loss: the sparse teacher must have one row per predicting position, "
                             f"shape {expected} + (k,), got {tuple(teacher.indices.shape)}")
        teacher = _with_last_position(teacher)
    if fused:
        hidden, weight, bias = hidden_states_and_head(student, student, model_inputs(batch))
        if sparse:
            return kdcore.fused_linear_kd_loss(hidden, weight, student_bias=bias, teacher=teacher, **common)
        with torch.no_grad():
            t_hidden, t_weight, t_bias = hidden_states_and_head(teacher, teacher, model_inputs(batch))
        return kdcore.fused_linear_kd_loss(hidden, weight, t_hidden, t_weight.detach(), student_bias=bias,
                                           teacher_bias=None if t_bias is None else t_bias.detach(), **common)
    logits = _logits(student, batch)
    if sparse:
        return kdcore.kd_loss(logits, teacher=teacher, **common)
    with torch.no_grad():
        teacher_logits = _logits(teacher, batch)
    return kdcore.kd_loss(logits, teacher_logits, **common)


def _aligned(batch: Mapping[str, torch.Tensor], student_tokenizer: Any, teacher_tokenizer: Any):
    """The student's next-token labels and spans, and the teacher's view, of a Hugging Face batch:
    from the batch when :class:`AlignedCollator` put them there, else computed now."""
    from kdcore.engine.data import Batch

    if all(key in batch for key in ALIGNED_KEYS):
        view = Batch({"input_ids": batch["teacher_input_ids"], "attention_mask": batch["teacher_attention_mask"]},
                     batch["teacher_labels"], spans=batch["teacher_spans"])
        return next_token_labels(batch["labels"]), batch["student_spans"], view
    aligned = _retokenizer(student_tokenizer, teacher_tokenizer)(_student_view(batch))
    return next_token_labels(batch["labels"]), aligned.spans, aligned.teacher_view


def _student_view(batch: Mapping[str, torch.Tensor]):
    """A Hugging Face batch in the engine's layout over the full ``input_ids`` (the labels moved one
    position left, the last position unlabelled), which :class:`Retokenizer` reads."""
    from kdcore.engine.data import Batch

    return Batch(model_inputs(batch), next_token_labels(batch["labels"]))


#: per pair of tokenizer objects (kept alive here, so their ids stay theirs): its Retokenizer and
#: shared vocabularies by mode, built once (each costs a pass over the vocabularies), not per step
_PAIRS: dict[tuple[int, int], tuple[Any, Any, Any, dict[str, Any]]] = {}


def _pair(student_tokenizer: Any, teacher_tokenizer: Any) -> tuple[Any, dict[str, Any]]:
    from kdcore.cross_tokenizer.retokenize import Retokenizer

    key = (id(student_tokenizer), id(teacher_tokenizer))
    if key not in _PAIRS:
        _PAIRS[key] = (student_tokenizer, teacher_tokenizer, Retokenizer(student_tokenizer, teacher_tokenizer), {})
    return _PAIRS[key][2], _PAIRS[key][3]


def _retokenizer(student_tokenizer: Any, teacher_tokenizer: Any):
    """The :class:`Retokenizer` of a pair of tokenizers."""
    return _pair(student_tokenizer, teacher_tokenizer)[0]


def _vocabulary(student_tokenizer: Any, teacher_tokenizer: Any, mode: str):
    from kdcore.cross_tokenizer.vocabulary import shared_vocabulary

    vocabularies = _pair(student_tokenizer, teacher_tokenizer)[1]
    if mode not in vocabularies:
        vocabularies[mode] = shared_vocabulary(student_tokenizer, teacher_tokenizer, mode)
    return vocabularies[mode]


def _cross_tokenizer_loss(student, teacher, batch, student_tokenizer, teacher_tokenizer, *, fused: bool, normalizer,
                          **options: Any) -> torch.Tensor:
    from kdcore.cross_tokenizer.losses import cross_tokenizer_kd_loss, fused_linear_cross_tokenizer_kd_loss

    unsupported = sorted(set(options) & {"sparse_mode", "vocab_size"})
    if unsupported:
        raise TypeError(f"causal_lm_kd_loss: {unsupported} have no meaning across tokenizers")
    kd_weight, ce_weight = options.pop("kd_weight", 1.0), options.pop("ce_weight", 0.0)
    labels, spans, view = _aligned(batch, student_tokenizer, teacher_tokenizer)
    device = batch["input_ids"].device
    view = view.to(device)
    mode = options.pop("vocabulary", "projected")
    if options.get("loss", "hybrid") != "uld":
        options["vocabulary"] = _vocabulary(student_tokenizer, teacher_tokenizer, mode)
    if normalizer is None:
        normalizer = (labels != -100).sum().clamp_min(1).float()
    common = dict(student_labels=labels, teacher_labels=view.labels, student_spans=spans, teacher_spans=view.spans,
                  normalizer=normalizer, **options)
    if fused:
        if ce_weight:
            raise ValueError("causal_lm_kd_loss: ce_weight with fused=True is not supported across tokenizers (the "
                             "fused path never builds the student's logits); use fused=False")
        hidden, weight, bias = hidden_states_and_head(student, student, model_inputs(batch))
        with torch.no_grad():
            t_hidden, t_weight, t_bias = hidden_states_and_head(teacher, teacher, view.inputs)
        return kd_weight * fused_linear_cross_tokenizer_kd_loss(hidden, weight, t_hidden, t_weight,
                                                                student_bias=bias, teacher_bias=t_bias, **common)
    logits = _logits(student, batch)
    with torch.no_grad():
        teacher_logits = teacher(**view.inputs).logits
    loss = kd_weight * cross_tokenizer_kd_loss(logits, teacher_logits, **common)
    if ce_weight:
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                               ignore_index=-100, reduction="sum")
        loss = loss + ce_weight * ce / torch.as_tensor(normalizer, dtype=torch.float32, device=ce.device)
    return loss


class AlignedCollator:
    """Wraps a Hugging Face collator (``collate(features) -> batch`` with ``input_ids``,
    ``attention_mask``, ``labels``) for distilling across tokenizers: each batch also carries the
    teacher's tokenization of its text and the alignment (``teacher_input_ids``,
    ``teacher_attention_mask``, ``teacher_labels``, ``student_spans``, ``teacher_spans``), computed
    here, in the DataLoader's worker processes, so the training step does not wait for it."""

    def __init__(self, collate, student_tokenizer: Any, teacher_tokenizer: Any) -> None:
        self.collate = collate
        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer

    def __call__(self, features):
        batch = dict(self.collate(features))
        aligned = _retokenizer(self.student_tokenizer, self.teacher_tokenizer)(_student_view(batch))
        view = aligned.teacher_view
        batch.update(teacher_input_ids=view.inputs["input_ids"], teacher_attention_mask=view.inputs["attention_mask"],
                     teacher_labels=view.labels, student_spans=aligned.spans, teacher_spans=view.spans)
        return batch


def _fsdp_version(accelerator) -> int | None:
    """The FSDP version (1 or 2) accelerate trains the student with, or None when it does not use FSDP
    (one process, DDP, DeepSpeed)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return None
    return accelerator.state.fsdp_plugin.fsdp_version


def prepare_teacher(teacher: torch.nn.Module, accelerator, device: torch.device) -> torch.nn.Module:
    """``teacher`` frozen (no parameter requires a gradient) in eval mode, placed as the student is:
    on ``device``, or sharded for inference when the student trains under FSDP2
    (:func:`shard_for_inference`), so that a teacher too large for one device still fits."""
    teacher.eval().requires_grad_(False)
    version = _fsdp_version(accelerator)
    if version is None:
        return teacher.to(device)
    if version != 2:
        raise ValueError(f"KDTrainer: the teacher can be sharded only under FSDP version 2, but this run uses "
                         f"fsdp_version {version}; set fsdp_config={{'version': 2}} in TrainingArguments (or "
                         f"fsdp_version: 2 in the accelerate config)")
    return shard_for_inference(teacher, accelerator)


def shard_for_inference(teacher: torch.nn.Module, accelerator) -> torch.nn.Module:
    """``teacher`` sharded with FSDP2 over the student's device mesh, with the student's
    mixed-precision and CPU-offload policies and no optimizer (:func:`kdcore.parallel.fsdp.shard`):
    one group per transformer block (the model's ``_no_split_modules`` classes), resharded as soon
    as the block has run, then the root (embeddings, final norm, LM head), which stays gathered
    after its forward because the fused loss reads the teacher's LM head weight then
    (:func:`hidden_states_and_head`); :meth:`KDTrainer.reshard_teacher` frees it once the step's
    backward is over. A teacher the caller has sharded already is kept as it is. Every process must
    hold the same teacher weights (``from_pretrained`` loads them so): each keeps its own shard."""
    from kdcore.parallel import fsdp

    if fsdp.is_sharded(teacher):
        return teacher
    plugin = accelerator.state.fsdp_plugin
    mesh = accelerator.torch_device_mesh
    fsdp.shard(teacher, None if mesh is None else mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)],
               blocks=fsdp.block_names(teacher), trainable=False, mp_policy=plugin.mixed_precision_policy,
               offload_policy=plugin.cpu_offload)
    return teacher


def _fsdp_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP2-sharded modules of ``model`` (none when it is not sharded, or without torch.distributed)."""
    if not torch.distributed.is_available():
        return []
    from kdcore.parallel import fsdp

    return fsdp.sharded_modules(model)


class KDTrainer(transformers.Trainer):
    """``transformers.Trainer`` training a student against ``teacher`` with
    :func:`causal_lm_kd_loss`. ``kd_options`` are its options (e.g. ``divergence="jsd"``,
    ``temperature=2.0``, ``ce_weight=0.5``, ``fused=True``; ``student_tokenizer`` and
    ``teacher_tokenizer`` to distil across tokenizers, best with an :class:`AlignedCollator` as the
    ``data_collator``). The teacher is frozen and kept in eval mode; it is never trained.

    Trainer counts the target tokens of the whole step (``num_items_in_batch``, over every
    accumulated micro-batch and process); the loss divides by it, so the accumulated gradient
    equals the full batch's.

    Placement follows the student's: on one device or under DDP the teacher is moved to the
    student's device, whole. Under accelerate's FSDP version 2 the teacher is sharded for
    inference over the same device mesh (:func:`shard_for_inference`: one FSDP group per
    transformer block, then the root); its root group stays gathered from the teacher's forward
    (``fused=True`` reads the teacher's LM head after it) until the step's backward is over, and is
    resharded after every training and evaluation step. ``fused=True`` works under FSDP2 as under
    DDP: the student's LM head is read while FSDP holds it gathered, and its gradient is
    reduce-scattered with the rest. FSDP version 1 is refused with a teacher.
    """

    def __init__(self, *args, teacher, kd_options: Mapping[str, Any] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = prepare_teacher(teacher, self.accelerator, self.args.device)
        self.teacher_shards = _fsdp_modules(self.teacher)
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
            # the count is summed over processes and DDP or FSDP averages their gradients: undo the mean
            loss = loss * self.accelerator.num_processes
        # no model outputs to hand Trainer's evaluation (the fused loss never builds logits): an empty dict
        return (loss, {}) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Trainer's step (forward and backward), then the sharded teacher's gathered groups freed,
        once nothing of the step can read them any more."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.reshard_teacher()
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Trainer's evaluation step on the distillation loss alone (:meth:`compute_loss` returns no
        logits), then the sharded teacher's gathered groups freed."""
        outputs = super().prediction_step(model, inputs, True, ignore_keys=ignore_keys)
        self.reshard_teacher()
        return outputs

    def reshard_teacher(self) -> None:
        """Frees the gathered parameters of the teacher's FSDP2 groups (FSDP does not reshard a root
        run under ``no_grad`` by itself); nothing without FSDP2."""
        for module in self.teacher_shards:
            module.reshard()
