"""The ``seq_kd`` method: sequence-level knowledge distillation (Kim & Rush, "Sequence-Level
Knowledge Distillation", 2016).

The teacher continues each training prompt (greedy decoding by default, beam search with
``num_beams``, or sampling), and the student is trained by cross-entropy on the teacher's
continuation instead of the dataset's: it learns the teacher's mode rather than the spread of the
references. ``kd_weight`` > 0 adds word-level distillation on the same tokens (Kim & Rush's
"Word + Seq-KD"): the divergence between the teacher's and the student's next-token distributions
at each generated position.

Prompts come from the data (see :mod:`kdcore.integrations.generation`: the input tokens up to the
first labelled position); the dataset's own continuations are discarded. The teacher generates
afresh at every step, under the run's seed. Needs Hugging Face causal LMs (``hf_causal_lm``).

Config keys: ``max_new_tokens`` (64), ``do_sample`` (false), ``generation_temperature`` (1.0),
``top_p`` (1.0), ``num_beams`` (1), ``eos_token_id`` (the teacher's); ``ce_weight`` (1.0),
``kd_weight`` (0.0) with ``divergence`` ("forward_kl") or ``loss`` (any registered loss),
``temperature`` (1.0), ``beta``, ``alpha``.
"""

from __future__ import annotations

import kdcore
from kdcore import _checks
from kdcore.engine.data import call_model
from kdcore.engine.method import Outputs, options_of
from kdcore.engine.named_loss import chosen_loss
from kdcore.engine.terms import cross_entropy
from kdcore.integrations.generation import continue_prompts, require_generate
from kdcore_plugins.common import GENERATION_DEFAULTS, generation_options

DEFAULTS = dict(GENERATION_DEFAULTS, ce_weight=1.0, kd_weight=0.0, loss=None, divergence="forward_kl",
                temperature=1.0, beta=0.5, alpha=0.1)


class SequenceKD(kdcore.Method):
    name = "seq_kd"

    def __init__(self, config):
        super().__init__(config)
        options = options_of(self.name, self.config, **DEFAULTS)
        self.generation = generation_options(self.name, options)
        self.temperature = options["temperature"]
        self.loss = chosen_loss(self.name, self.config, options)
        self.loss.check(self.name, self.temperature)
        kd_weight = _checks.non_negative(self.name, "kd_weight", options["kd_weight"])
        self.default_weights = {"ce": _checks.non_negative(self.name, "ce_weight", options["ce_weight"])}
        if kd_weight > 0:
            self.default_weights["kd"] = kd_weight

    def setup(self, ctx):
        if "teacher0" not in ctx.models:
            raise ValueError("seq_kd needs a teacher to generate the targets: list one under teachers in the run "
                             "config")
        require_generate(ctx.raw("teacher0"), self.name)

    def prepare_batch(self, batch, ctx):
        return continue_prompts(ctx.raw("teacher0"), batch, ctx.ignore_index, self.generation, method=self.name)

    def run_models(self, batch, ctx, trainable):
        if "kd" in self.default_weights:
            return super().run_models(batch, ctx, trainable)
        return Outputs(call_model(ctx.models["student"], batch.inputs))  # the teacher's logits are not needed

    def losses(self, batch, outputs, ctx):
        terms = {"ce": cross_entropy(outputs.student, batch.labels, ctx, method=self.name)}
        if "kd" in self.default_weights:
            terms["kd"] = self.loss(outputs.student, outputs.teachers[0], labels=batch.labels,
                                    ignore_index=ctx.ignore_index, temperature=self.temperature,
                                    normalizer=ctx.normalizer)
        return terms


@kdcore.hookimpl
def kdcore_register_methods(register):
    register("seq_kd", SequenceKD, description="Kim & Rush 2016: train on the teacher's generated continuations "
                                               "(optionally + word-level KD)")
