"""The ``born_again`` method: Furlanello et al., "Born-Again Neural Networks" (ICML 2018).

Students of the *same* architecture are trained in generations: generation 1 learns from the
run's teacher, generation k from generation k−1 (or, with ``ensemble: true``, from the average of
the teacher's and every earlier generation's predictions, the paper's BAN ensemble). Each
generation is a stage (``gen1``, ``gen2``, ...) that starts from a fresh student, loads the
earlier generations from their saved files, and is resumable on its own. The final student is the
last generation. Without a teacher in the config, generation 1 is trained on labels alone and
teaches generation 2.

Config keys: ``generations`` (default 2), ``ensemble`` (default false), and the response-KD keys
``temperature`` (default 1.0, as in the paper), ``divergence`` or ``loss``, ``beta``, ``alpha``,
``kd_weight`` (default 1.0), ``ce_weight`` (default 1.0).
"""

from __future__ import annotations

import torch

import kdcore
from kdcore.engine.method import options_of
from kdcore.engine.terms import cross_entropy, mixture_logits
from kdcore_plugins.common import RESPONSE_DEFAULTS, ResponseTerms


class BornAgain(kdcore.Method):
    name = "born_again"

    def __init__(self, config):
        super().__init__(config)
        defaults = {**RESPONSE_DEFAULTS, "temperature": 1.0, "kd_weight": 1.0, "ce_weight": 1.0}
        options = options_of(self.name, self.config, generations=2, ensemble=False, **defaults)
        self.generations = options["generations"]
        if not isinstance(self.generations, int) or self.generations < 1:
            raise ValueError(f"born_again: generations must be a positive integer, got {self.generations!r}")
        self.ensemble = bool(options["ensemble"])
        self.response = ResponseTerms(self.name, self.config, options)
        self.default_weights = self.response.weights

    def plan(self, config):
        stages = []
        for k in range(1, self.generations + 1):
            if k == 1:
                teachers = None if config.teachers else []
            elif self.ensemble:
                teachers = [*config.teachers, *(f"stage:gen{j}" for j in range(1, k))]
            else:
                teachers = ["previous"]
            stages.append(kdcore.Stage(f"gen{k}", teachers=teachers))
        return stages

    def teacher_logits(self, outputs):
        if not outputs.teachers:
            return None
        if len(outputs.teachers) == 1:
            return outputs.teachers[0]
        log_probs = [t.float().log_softmax(-1) for t in outputs.teachers]
        return mixture_logits(log_probs, torch.full((len(log_probs),), 1 / len(log_probs)), 1.0)

    def losses(self, batch, outputs, ctx):
        if not outputs.teachers:  # generation 1 with no teacher in the config
            return {"ce": cross_entropy(outputs.student, batch.labels, ctx, method=self.name)}
        temperature = self.response.temperature
        teacher = outputs.teachers[0]
        if len(outputs.teachers) > 1:
            log_probs = [(t.float() / temperature).log_softmax(-1) for t in outputs.teachers]
            teacher = mixture_logits(log_probs, torch.full((len(log_probs),), 1 / len(log_probs)), temperature)
        return self.response(outputs.student, teacher, batch, ctx)


@kdcore.hookimpl
def kdcore_register_methods(register):
    register("born_again", BornAgain, description="Furlanello et al. 2018: same-size generations, each taught "
                                                  "by the previous (or their ensemble)")
