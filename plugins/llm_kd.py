"""The ``llm_kd`` method: token-level logit distillation of causal language models.

At every position with a label (prompt and padding positions carry the run's ``ignore_index`` and
count for nothing), the student's next-token distribution matches the teacher's under any
divergence of :func:`kdcore.kd_loss` (forward or reverse KL, JSD(β), skew KL/RKL(α), TVD), plus
cross-entropy on the labels when ``ce_weight`` > 0. Its one term, ``kd``, is
``kd_weight · T² · D + ce_weight · CE`` averaged over the step's labelled tokens: the fused kernels
compute both parts in one pass over the vocabulary.

With ``fused: true`` (Hugging Face causal LMs, ``model: hf_causal_lm``) neither model's
``[tokens, vocab]`` logits are materialized: the models return their last hidden states and the
loss runs through :func:`kdcore.fused_linear_kd_loss` on them and the LM heads, so memory does not
grow with the vocabulary. Teacher and student may have vocabularies of different sizes over the
same leading token ids: ``vocab_size`` is the shared part (the extra columns are dropped).

Config keys: ``divergence`` (default ``"forward_kl"``), ``temperature`` (1.0), ``beta`` / ``alpha``
(the divergence's parameter), ``kd_weight`` (1.0), ``ce_weight`` (0.0), ``fused`` (false),
``vocab_size`` (None: both vocabularies the same size).
"""

from __future__ import annotations


import kdcore
from kdcore.engine.method import options_of
from kdcore.functional import loss_options
from kdcore_plugins.common import hidden_state_outputs

DEFAULTS = dict(divergence="forward_kl", temperature=1.0, beta=0.5, alpha=0.1, kd_weight=1.0, ce_weight=0.0,
                fused=False, vocab_size=None)


class LLMKD(kdcore.Method):
    name = "llm_kd"
    default_weights = {"kd": 1.0}

    def __init__(self, config):
        super().__init__(config)
        options = options_of(self.name, self.config, **DEFAULTS)
        if not isinstance(options["fused"], bool):
            raise ValueError(f"llm_kd: fused must be true or false, got {options['fused']!r}")
        self.fused = options.pop("fused")
        loss_options(self.name, t2_scale=True, reduction="batchmean", ignore_index=-100,
                     **{key: options[key] for key in ("divergence", "temperature", "beta", "alpha", "kd_weight",
                                                      "ce_weight")})
        self.options = options

    def setup(self, ctx):
        if "teacher0" not in ctx.models:
            raise ValueError("llm_kd needs a teacher: list one under teachers in the run config")

    def run_models(self, batch, ctx, trainable):
        if not self.fused:
            return super().run_models(batch, ctx, trainable)
        return hidden_state_outputs(batch, ctx)

    def losses(self, batch, outputs, ctx):
        common = dict(labels=batch.labels, ignore_index=ctx.ignore_index, normalizer=ctx.normalizer, **self.options)
        if self.fused:
            hidden, weight, bias = outputs.features["student"]
            t_hidden, t_weight, t_bias = outputs.features["teacher0"]
            return {"kd": kdcore.fused_linear_kd_loss(hidden, weight, t_hidden, t_weight, student_bias=bias,
                                                      teacher_bias=t_bias, **common)}
        return {"kd": kdcore.kd_loss(outputs.student, outputs.teachers[0], **common)}


@kdcore.hookimpl
def kdcore_register_methods(register):
    register("llm_kd", LLMKD, description="token-level logit distillation of causal LMs: any divergence, prompt "
                                          "tokens masked, optionally fused (no [tokens, vocab] logits)")
