"""The ``gkd`` method: on-policy generalized knowledge distillation (Agarwal et al., "On-Policy
Distillation of Language Models: Learning from Self-Generated Mistakes", ICLR 2024).

A fraction ``lmbda`` of optimizer steps trains on the student's own samples: the student
continues each prompt (sampling at ``generation_temperature``), and the divergence between the
teacher's and the student's token distributions is minimized on those tokens, so the student is
corrected where its own generations go, not only where the data goes. The other steps train on the
dataset's continuations (or, with ``seq_kd: true``, on the teacher's). Whether a step is
on-policy is drawn from the run's seed and the step number: the same on every process and micro-
batch, and again the same when a run resumes. The divergence defaults to the paper's generalized
JSD(β) (β = 0.5); any divergence of :func:`kdcore.kd_loss` works (``forward_kl`` with λ = 0 is
supervised KD, ``reverse_kl`` with λ = 1 on-policy reverse KL), and so does any registered loss
(``loss: NAME``). No gradient flows through the sampling.

Needs Hugging Face causal LMs (``hf_causal_lm``); prompts come from the data (see
:mod:`kdcore.integrations.generation`).

Config keys: ``lmbda`` (0.5), ``seq_kd`` (false), ``divergence`` ("jsd") or ``loss`` (a
registered loss's name, or ``{name: NAME, option: value}``; not both), ``beta`` (0.5), ``alpha``,
``temperature`` (1.0, of the loss); ``max_new_tokens`` (64), ``do_sample`` (true),
``generation_temperature`` (1.0), ``top_p`` (1.0), ``num_beams`` (1), ``eos_token_id``.
"""

from __future__ import annotations


import kdcore
from kdcore.engine.method import options_of
from kdcore.engine.named_loss import chosen_loss
from kdcore.integrations.generation import continue_prompts, require_generate
from kdcore_plugins.common import GENERATION_DEFAULTS, generation_options, on_policy_step

DEFAULTS = dict(GENERATION_DEFAULTS, do_sample=True, lmbda=0.5, seq_kd=False, loss=None, divergence="jsd", beta=0.5,
                alpha=0.1, temperature=1.0)


class GKD(kdcore.Method):
    name = "gkd"
    default_weights = {"kd": 1.0}

    def __init__(self, config):
        super().__init__(config)
        options = options_of(self.name, self.config, **DEFAULTS)
        self.generation = generation_options(self.name, options)
        self.lmbda = options["lmbda"]
        if isinstance(self.lmbda, bool) or not isinstance(self.lmbda, (int, float)) or not 0 <= self.lmbda <= 1:
            raise ValueError(f"gkd: lmbda (the fraction of on-policy steps) must lie in [0, 1], got {self.lmbda!r}")
        if not isinstance(options["seq_kd"], bool):
            raise ValueError(f"gkd: seq_kd must be true or false, got {options['seq_kd']!r}")
        self.seq_kd = options["seq_kd"]
        self.temperature = options["temperature"]
        self.loss = chosen_loss(self.name, self.config, options)
        self.loss.check(self.name, self.temperature)

    def setup(self, ctx):
        if "teacher0" not in ctx.models:
            raise ValueError("gkd needs a teacher: list one under teachers in the run config")
        for role in ("student", "teacher0"):  # on-policy steps sample from the student, the others from the teacher
            require_generate(ctx.raw(role), self.name)

    def on_policy(self, ctx) -> bool:
        """Whether the current step trains on the student's samples."""
        return on_policy_step(ctx, self.lmbda)

    def prepare_batch(self, batch, ctx):
        if self.on_policy(ctx):
            return continue_prompts(ctx.raw("student"), batch, ctx.ignore_index, self.generation, method=self.name)
        if self.seq_kd:
            return continue_prompts(ctx.raw("teacher0"), batch, ctx.ignore_index, self.generation, method=self.name)
        return batch

    def losses(self, batch, outputs, ctx):
        return {"kd": self.loss(outputs.student, outputs.teachers[0], labels=batch.labels,
                                ignore_index=ctx.ignore_index, temperature=self.temperature, normalizer=ctx.normalizer)}


@kdcore.hookimpl
def kdcore_register_methods(register):
    register("gkd", GKD, description="Agarwal et al. 2024: on-policy distillation, a fraction lmbda of steps on the "
                                     "student's own samples, generalized JSD")
