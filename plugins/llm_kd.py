"""The ``llm_kd`` method: token-level logit distillation of causal language models.

At every position with a label (prompt and padding positions carry the run's ``ignore_index`` and
count for nothing), the student's next-token distribution matches the teacher's under any
divergence of :func:`kdcore.kd_loss` (forward or reverse KL, JSD(β), skew KL/RKL(α), TVD), plus
cross-entropy on the labels when ``ce_weight`` > 0. Its one term, ``kd``, is
``kd_weight · T² · D + ce_weight · CE`` averaged over the step's labelled tokens: the fused kernels
compute both parts in one pass over the vocabulary. ``loss: NAME`` puts any registered loss in
place of the divergence (``kd_weight · loss + ce_weight · CE``, the label term computed apart).

With ``fused: true`` (Hugging Face causal LMs, ``model: hf_causal_lm``) neither model's
``[tokens, vocab]`` logits are materialized: the models return their last hidden states and the
loss runs through :func:`kdcore.fused_linear_kd_loss` on them and the LM heads, so memory does not
grow with the vocabulary; only kd_loss's divergences run there. Teacher and student may have
vocabularies of different sizes over the same leading token ids: ``vocab_size`` is the shared part
(the extra columns are dropped).

Config keys: ``divergence`` (default ``"forward_kl"``) or ``loss`` (a registered loss's name, or
``{name: NAME, option: value}``; not both), ``temperature`` (1.0), ``beta`` / ``alpha`` (the
divergence's parameter), ``kd_weight`` (1.0), ``ce_weight`` (0.0), ``fused`` (false),
``vocab_size`` (None: both vocabularies the same size).
"""

from __future__ import annotations

import kdcore
from kdcore import _checks
from kdcore.divergences import DIVERGENCES
from kdcore.engine.method import options_of
from kdcore.engine.named_loss import chosen_loss
from kdcore.engine.terms import cross_entropy
from kdcore.functional import shared_vocab
from kdcore_plugins.common import hidden_state_outputs

DEFAULTS = dict(loss=None, divergence="forward_kl", temperature=1.0, beta=0.5, alpha=0.1, kd_weight=1.0, ce_weight=0.0,
                fused=False, vocab_size=None)


class LLMKD(kdcore.Method):
    name = "llm_kd"
    default_weights = {"kd": 1.0}

    def __init__(self, config):
        super().__init__(config)
        options = options_of(self.name, self.config, **DEFAULTS)
        if not isinstance(options["fused"], bool):
            raise ValueError(f"llm_kd: fused must be true or false, got {options['fused']!r}")
        self.fused = options["fused"]
        self.loss = chosen_loss(self.name, self.config, options)
        if self.fused and self.loss.divergence is None:
            raise ValueError(f"llm_kd: fused: true runs only kd_loss's divergences ({', '.join(DIVERGENCES)}), and "
                             f"loss {self.loss.name!r} needs the logits; set fused: false or choose a divergence")
        self.temperature = options["temperature"]
        self.loss.check(self.name, self.temperature)
        self.kd_weight = _checks.non_negative(self.name, "kd_weight", options["kd_weight"])
        self.ce_weight = _checks.non_negative(self.name, "ce_weight", options["ce_weight"])
        self.vocab_size = options["vocab_size"]

    def setup(self, ctx):
        if "teacher0" not in ctx.models:
            raise ValueError("llm_kd needs a teacher: list one under teachers in the run config")

    def run_models(self, batch, ctx, trainable):
        if not self.fused:
            return super().run_models(batch, ctx, trainable)
        return hidden_state_outputs(batch, ctx)

    def losses(self, batch, outputs, ctx):
        row = dict(labels=batch.labels, ignore_index=ctx.ignore_index, temperature=self.temperature,
                   normalizer=ctx.normalizer)
        if self.loss.divergence is None:
            return {"kd": self.weighted_loss(outputs.student, outputs.teachers[0], batch, ctx, row)}
        # a divergence: the fused kernels compute it and the label term in one pass
        common = dict(row, divergence=self.loss.divergence, kd_weight=self.kd_weight, ce_weight=self.ce_weight,
                      vocab_size=self.vocab_size, **self.loss.options)
        if self.fused:
            hidden, weight, bias = outputs.features["student"]
            t_hidden, t_weight, t_bias = outputs.features["teacher0"]
            return {"kd": kdcore.fused_linear_kd_loss(hidden, weight, t_hidden, t_weight, student_bias=bias,
                                                      teacher_bias=t_bias, **common)}
        return {"kd": kdcore.kd_loss(outputs.student, outputs.teachers[0], **common)}

    def weighted_loss(self, student, teacher, batch, ctx, row):
        """``kd_weight · loss + ce_weight · CE`` with a registered loss that is not a divergence, on
        the shared vocabulary."""
        vocab = shared_vocab(self.name, ("the student", student.shape[-1]), ("the teacher", teacher.shape[-1]),
                             self.vocab_size)
        student, teacher = student[..., :vocab], teacher[..., :vocab]
        kd = self.kd_weight * self.loss(student, teacher, **row)
        if self.ce_weight > 0:
            kd = kd + self.ce_weight * cross_entropy(student, batch.labels, ctx, method=self.name)
        return kd


@kdcore.hookimpl
def kdcore_register_methods(register):
    register("llm_kd", LLMKD, description="token-level logit distillation of causal LMs: any divergence, prompt "
                                          "tokens masked, optionally fused (no [tokens, vocab] logits)")
