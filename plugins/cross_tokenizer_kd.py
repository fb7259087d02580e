"""The ``cross_tokenizer_kd`` method: distilling a causal language model from a teacher that uses
another tokenizer.

Both models read the same text, each in its own tokens (``data.dataset: aligned_text``, which
tokenizes every window with both tokenizers and aligns them in the data pipeline; the models name
their tokenizers with ``student.tokenizer`` and ``teachers.0.tokenizer``). The ``kd`` term compares
the two models on every span of text both tokenizations agree on, with
:func:`kdcore.cross_tokenizer.cross_tokenizer_kd_loss`: ``loss: uld`` (Universal Logit
Distillation: sorted probabilities, no vocabulary map), ``shared_vocab`` (any kd_loss divergence
over the tokens both vocabularies share plus one tail bucket, on the fused kernels) or ``hybrid``
(GOLD's: the two together, ULD over the unshared tokens). ``vocabulary`` says which tokens are
shared: ``exact`` (equal texts) or ``projected`` (every teacher token counted under the longest
student token its text begins with, so that the teacher's mass on tokens longer than any of the
student's is compared where the student puts it, not lumped into the tail). ``ce_weight`` > 0 adds cross-entropy on
the student's own labels as the ``ce`` term. Both are averaged over the step's labelled student
tokens.

With ``lmbda`` > 0 that fraction of optimizer steps is on-policy, as in ``gkd``: the student
continues each prompt (sampling at ``generation_temperature``), its samples are turned back into
text and tokenized for the teacher, and the loss is taken on them. ``fused: true`` never
materializes either model's ``[tokens, vocab]`` logits (Hugging Face causal LMs).

Evaluation reports the student's token-level metrics on its own tokens and ``byte_perplexity``,
which compares it with the teacher and with students of any tokenizer; agreement and KL with the
teacher are not defined across vocabularies and are not reported.

Config keys: ``loss`` ("hybrid"), ``vocabulary`` ("projected"), ``divergence`` ("forward_kl"), ``temperature`` (1.0), ``beta``,
``alpha``, ``uld_top_k`` (None: every token), ``shared_weight`` / ``uld_weight`` (1.0, the hybrid's
weights), ``kd_weight`` (1.0), ``ce_weight`` (0.0), ``fused`` (false), ``chunk_size`` (spans per
chunk, None: automatic), ``lmbda`` (0.0), ``teacher_max_length`` (the teacher's position limit when
on-policy text is longer; None: the model config's), and the generation keys of ``gkd``
(``max_new_tokens``, ``do_sample`` (true), ``generation_temperature``, ``top_p``, ``num_beams``,
``eos_token_id``).
"""

from __future__ import annotations


import kdcore
from kdcore.cross_tokenizer.losses import (
    LOSSES,
    SPANS,
    cross_tokenizer_kd_loss,
    fused_linear_cross_tokenizer_kd_loss,
)
from kdcore.cross_tokenizer.retokenize import Retokenizer
from kdcore.cross_tokenizer.vocabulary import VOCABULARY_MODES, shared_vocabulary
from kdcore.engine.builders import build_tokenizers
from kdcore.engine.data import Batch
from kdcore.engine.method import options_of
from kdcore.engine.terms import cross_entropy
from kdcore.functional import loss_options
from kdcore.integrations.generation import continue_prompts, require_generate
from kdcore_plugins.common import GENERATION_DEFAULTS, generation_options, hidden_state_outputs, on_policy_step

LOSS_KEYS = ("loss", "divergence", "temperature", "beta", "alpha", "uld_top_k", "shared_weight", "uld_weight",
             "spans", "chunk_size")
DEFAULTS = dict(GENERATION_DEFAULTS, do_sample=True, loss="hybrid", vocabulary="projected", divergence="forward_kl",
                spans="all", temperature=1.0, beta=0.5,
                alpha=0.1, uld_top_k=None, shared_weight=1.0, uld_weight=1.0, kd_weight=1.0, ce_weight=0.0,
                fused=False, chunk_size=None, lmbda=0.0, teacher_max_length=None)


class CrossTokenizerKD(kdcore.Method):
    name = "cross_tokenizer_kd"

    def __init__(self, config):
        super().__init__(config)
        options = options_of(self.name, self.config, **DEFAULTS)
        if options["loss"] not in LOSSES:
            raise ValueError(f"cross_tokenizer_kd: loss must be one of {', '.join(LOSSES)}, got {options['loss']!r}")
        if options["vocabulary"] not in VOCABULARY_MODES:
            raise ValueError(f"cross_tokenizer_kd: vocabulary must be one of {', '.join(VOCABULARY_MODES)}, got "
                             f"{options['vocabulary']!r}")
        self.vocabulary_mode = options["vocabulary"]
        if options["spans"] not in SPANS:
            raise ValueError(f"cross_tokenizer_kd: spans must be one of {', '.join(SPANS)}, got {options['spans']!r}")
        for key in ("fused",):
            if not isinstance(options[key], bool):
                raise ValueError(f"cross_tokenizer_kd: {key} must be true or false, got {options[key]!r}")
        lmbda = options["lmbda"]
        if isinstance(lmbda, bool) or not isinstance(lmbda, (int, float)) or not 0 <= lmbda <= 1:
            raise ValueError(f"cross_tokenizer_kd: lmbda (the fraction of on-policy steps) must lie in [0, 1], got "
                             f"{lmbda!r}")
        limit = options["teacher_max_length"]
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 2):
            raise ValueError(f"cross_tokenizer_kd: teacher_max_length must be an int >= 2 or null, got {limit!r}")
        loss_options(self.name, divergence=options["divergence"], temperature=options["temperature"],
                     beta=options["beta"], alpha=options["alpha"], t2_scale=True, kd_weight=options["kd_weight"],
                     ce_weight=options["ce_weight"], ignore_index=-100, reduction="sum")
        if options["fused"] and options["ce_weight"] > 0:
            raise ValueError("cross_tokenizer_kd: ce_weight > 0 with fused: true is not supported (the fused path never "
                             "builds the student's logits); set ce_weight: 0 or fused: false")
        self.generation = generation_options(self.name, options)
        self.loss_options = {key: options[key] for key in LOSS_KEYS}
        self.default_weights = {"kd": float(options["kd_weight"]), "ce": float(options["ce_weight"])}
        self.fused, self.lmbda, self.teacher_max_length = options["fused"], float(lmbda), limit
        self.vocabulary = None
        self.retokenize: Retokenizer | None = None

    def setup(self, ctx):
        if "teacher0" not in ctx.models:
            raise ValueError("cross_tokenizer_kd needs a teacher: list one under teachers in the run config")
        config = ctx.run.config
        tokenizers = build_tokenizers(ctx.run.student_spec(ctx.index), ctx.run.teacher_specs(ctx.index))
        missing = [key for key, role in (("student.tokenizer", "student"), ("teachers.0.tokenizer", "teacher0"))
                   if role not in tokenizers]
        if missing:
            raise ValueError(f"cross_tokenizer_kd: name the tokenizer of each model ({', '.join(missing)}: a "
                             "tokenizer.json, a directory holding one, or a tokenizer that ships with kdcore)")
        if ctx.example is not None and ctx.example.teacher_view is None:
            raise ValueError(f"cross_tokenizer_kd: data.dataset {config.data.dataset!r} gives no teacher view of the "
                             "text; use a dataset that tokenizes for both models (data.dataset: aligned_text)")
        if self.loss_options["loss"] != "uld":
            self.vocabulary = shared_vocabulary(tokenizers["student"], tokenizers["teacher0"], self.vocabulary_mode)
        if self.lmbda > 0:
            require_generate(ctx.raw("student"), self.name)
            teacher_config = getattr(ctx.raw("teacher0"), "config", None)
            limit = self.teacher_max_length or getattr(teacher_config, "n_positions", None) or getattr(
                teacher_config, "max_position_embeddings", None)
            self.retokenize = Retokenizer(tokenizers["student"], tokenizers["teacher0"],
                                          ignore_index=ctx.ignore_index, teacher_length=None if limit is None else limit - 1)

    def on_policy(self, ctx) -> bool:
        """Whether the current step trains on the student's samples (the same draw as gkd's)."""
        return self.lmbda > 0 and on_policy_step(ctx, self.lmbda)

    def prepare_batch(self, batch, ctx):
        if not self.on_policy(ctx):
            return batch
        student_only = Batch({key: batch.inputs[key] for key in ("input_ids", "attention_mask") if key in batch.inputs},
                             batch.labels)
        return self.retokenize(continue_prompts(ctx.raw("student"), student_only, ctx.ignore_index, self.generation,
                                                method=self.name))

    def run_models(self, batch, ctx, trainable):
        if not self.fused:
            return super().run_models(batch, ctx, trainable)
        return hidden_state_outputs(batch, ctx)

    def losses(self, batch, outputs, ctx):
        view = batch.teacher_view
        if view is None or batch.spans is None or view.spans is None:
            raise ValueError("cross_tokenizer_kd: the batch carries no alignment; use data.dataset: aligned_text")
        common = dict(student_labels=batch.labels, teacher_labels=view.labels, student_spans=batch.spans,
                      teacher_spans=view.spans, vocabulary=self.vocabulary, normalizer=ctx.normalizer,
                      **self.loss_options)
        if self.fused:
            hidden, weight, bias = outputs.features["student"]
            t_hidden, t_weight, t_bias = outputs.features["teacher0"]
            return {"kd": fused_linear_cross_tokenizer_kd_loss(hidden, weight, t_hidden, t_weight, student_bias=bias,
                                                               teacher_bias=t_bias, **common)}
        terms = {"kd": cross_tokenizer_kd_loss(outputs.student, outputs.teachers[0], **common)}
        if self.default_weights["ce"] > 0:
            terms["ce"] = cross_entropy(outputs.student, batch.labels, ctx, method=self.name)
        return terms

    def teacher_logits(self, outputs):
        return None  # the teacher's tokens are not the student's: no per-position comparison


@kdcore.hookimpl
def kdcore_register_methods(register):
    register("cross_tokenizer_kd", CrossTokenizerKD,
             description="distillation across tokenizers on aligned text spans: ULD, shared-vocabulary divergence "
                         "(fused kernels) or their hybrid; optionally on-policy")
