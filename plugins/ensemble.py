"""The ``ensemble`` method: distillation from several teachers at once (Hinton et al. 2015 §3;
You et al., "Learning from Multiple Teacher Networks", KDD 2017; confidence weighting as in
Zhang et al., "Confidence-Aware Multi-Teacher Knowledge Distillation", ICASSP 2022).

The teachers' predictions are combined into one target distribution, which the student matches
with response KD:

* ``space: probability`` (default): p = Σ_k w_k · softmax(z_k / T_k), a mixture of the teachers'
  softened distributions (each teacher may have its own temperature T_k);
* ``space: logit``: p = softmax(Σ_k w_k · z_k / T_k), the teachers' averaged logits.

Weights are fixed (``weights: [w_1, ...]``, normalized to sum to 1; uniform by default) or, with
``weights: confidence``, chosen per example: w_k ∝ the top-1 probability of teacher k, so the
surest teacher leads on each example. The student side uses ``temperature``. Evaluation compares
the student with the combination at temperature 1.

Config keys: ``space``, ``weights``, ``temperatures`` (one per teacher; default: ``temperature``
for all), and the response-KD keys ``temperature``, ``divergence`` or ``loss``, ``beta``,
``alpha``, ``kd_weight``, ``ce_weight``.
"""

from __future__ import annotations

import torch

import kdcore
from kdcore.engine.method import options_of
from kdcore.engine.terms import mixture_logits
from kdcore_plugins.common import RESPONSE_DEFAULTS, ResponseTerms


class Ensemble(kdcore.Method):
    name = "ensemble"

    def __init__(self, config):
        super().__init__(config)
        options = options_of(self.name, self.config, space="probability", weights=None, temperatures=None,
                             **RESPONSE_DEFAULTS)
        if options["space"] not in ("probability", "logit"):
            raise ValueError(f"ensemble: space must be 'probability' or 'logit', got {options['space']!r}")
        weights = options["weights"]
        if not (weights is None or weights == "confidence" or (
                isinstance(weights, list) and weights and all(isinstance(w, (int, float)) and w >= 0 for w in weights)
                and sum(weights) > 0)):
            raise ValueError(f"ensemble: weights must be 'confidence' or a list of non-negative numbers, got {weights!r}")
        temperatures = options["temperatures"]
        if temperatures is not None and not (isinstance(temperatures, list) and all(
                isinstance(t, (int, float)) and t > 0 for t in temperatures)):
            raise ValueError(f"ensemble: temperatures must be a list of positive numbers, got {temperatures!r}")
        self.space, self.weights, self.temperatures = options["space"], weights, temperatures
        self.response = ResponseTerms(self.name, self.config, options)
        self.default_weights = self.response.weights

    def plan(self, config):
        count = len(config.teachers)
        if count < 1:
            raise ValueError("ensemble: list the teachers under teachers in the run config")
        for key, value in (("weights", self.weights), ("temperatures", self.temperatures)):
            if isinstance(value, list) and len(value) != count:
                raise ValueError(f"ensemble: {key} has {len(value)} entries for {count} teachers")
        return [kdcore.Stage(self.name)]

    def teacher_weights(self, teachers: list[torch.Tensor], temperatures: list[float]) -> torch.Tensor:
        """``[K]`` fixed weights, or ``[..., K]`` per-example confidence weights; they sum to 1."""
        if self.weights == "confidence":
            confidence = torch.stack([(t.float() / temp).softmax(-1).amax(-1)
                                      for t, temp in zip(teachers, temperatures)], dim=-1)
            return confidence / confidence.sum(-1, keepdim=True)
        raw = torch.tensor(self.weights or [1.0] * len(teachers), dtype=torch.float32, device=teachers[0].device)
        return raw / raw.sum()

    def combined(self, teachers: list[torch.Tensor], student_temperature: float, temperatures: list[float]):
        """Teacher logits whose softmax at ``student_temperature`` is the combined distribution."""
        weights = self.teacher_weights(teachers, temperatures)
        if self.space == "logit":
            scaled = torch.stack([t.float() / temp for t, temp in zip(teachers, temperatures)], dim=-1)
            mixed = (scaled * (weights.unsqueeze(-2) if weights.dim() > 1 else weights)).sum(-1)
            return student_temperature * mixed
        log_probs = [(t.float() / temp).log_softmax(-1) for t, temp in zip(teachers, temperatures)]
        return mixture_logits(log_probs, weights, student_temperature)

    def teacher_logits(self, outputs):
        return self.combined(outputs.teachers, 1.0, [1.0] * len(outputs.teachers))

    def losses(self, batch, outputs, ctx):
        temperature = self.response.temperature
        temperatures = self.temperatures or [temperature] * len(outputs.teachers)
        teacher = self.combined(outputs.teachers, temperature, temperatures)
        return self.response(outputs.student, teacher, batch, ctx)


@kdcore.hookimpl
def kdcore_register_methods(register):
    register("ensemble", Ensemble, description="several teachers combined in probability or logit space, fixed "
                                               "or confidence weights")
