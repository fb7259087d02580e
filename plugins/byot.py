"""The ``byot`` method: Zhang et al., "Be Your Own Teacher: Improve the Performance of
Convolutional Neural Networks via Self Distillation" (ICCV 2019).

No separate teacher: the network's deepest output teaches classifiers attached to its shallower
layers. At each named layer an exit head (a bottleneck to the width of ``feature_layer`` if given,
then a linear classifier; spatial maps are average-pooled) is added as a trainable module. Per
exit, three terms: cross-entropy on the labels (``exit_ce``, weight 1 − α), KL from the final
output softened at ``temperature`` (``exit_kd``, weight α, the teacher side detached), and, with
``feature_layer``, an L2 hint from the deepest features to the exit's bottleneck (``exit_hint``,
weight λ). The final output trains on the labels (``ce``). For classification: exits predict one
label per example. The student is the whole network; exits
are training scaffolding, saved in checkpoints and dropped after training.

The exit KD term is not scaled by T², as in the authors' code (the first author's
ArchipLab-LinfengZhang/pytorch-self-distillation-final, written for the paper's journal version;
in ``train.py`` its ``CrossEntropy`` is ``−Σ softmax(final / T) · log_softmax(exit / T)`` averaged
over the batch, weighted by ``loss_coefficient`` α and nothing else). That cross-entropy exceeds this KL by the entropy of the
detached final output, a constant for the exit, so the gradients are the same. ``t2_scale: true``
multiplies the term by T² (Hinton et al.'s convention, which keeps the gradient's size
independent of T; at the default T = 3 the term and its gradient are 9 times larger).

Config keys: ``exits`` (required: submodule paths, shallow to deep), ``feature_layer`` (default
None: no hint term), ``temperature`` (default 3.0), ``alpha`` (default 0.3), ``hint_weight``
(λ, default 0.03), ``t2_scale`` (default false).
"""

from __future__ import annotations

import torch
from torch import nn

import kdcore
from kdcore.engine.method import options_of
from kdcore.engine.terms import cross_entropy
from kdcore_plugins.common import pooled, without_teachers


class ExitHead(nn.Module):
    """Bottleneck (to the deepest features' width) and classifier on a pooled feature map."""

    def __init__(self, width: int, bottleneck: int, classes: int) -> None:
        super().__init__()
        self.bottleneck = nn.Sequential(nn.Linear(width, bottleneck), nn.ReLU())
        self.classifier = nn.Linear(bottleneck, classes)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.bottleneck(pooled(features).flatten(1))
        return self.classifier(hidden), hidden


class BeYourOwnTeacher(kdcore.Method):
    name = "byot"

    def __init__(self, config):
        super().__init__(config)
        options = options_of(self.name, self.config, exits=None, feature_layer=None, temperature=3.0, alpha=0.3,
                             hint_weight=0.03, t2_scale=False)
        exits = options["exits"]
        if not isinstance(exits, list) or not exits or not all(isinstance(e, str) for e in exits):
            raise ValueError(f"byot: exits must be a non-empty list of layer names, got {exits!r}")
        alpha = float(options["alpha"])
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"byot: alpha must lie in [0, 1], got {alpha}")
        if not isinstance(options["t2_scale"], bool):
            raise ValueError(f"byot: t2_scale must be true or false, got {options['t2_scale']!r}")
        self.exits, self.feature_layer = exits, options["feature_layer"]
        self.t2_scale = options["t2_scale"]
        self.temperature = float(options["temperature"])
        self.default_weights = {"ce": 1.0, "exit_ce": 1.0 - alpha, "exit_kd": alpha,
                                "exit_hint": float(options["hint_weight"])}

    def plan(self, config):
        return [kdcore.Stage(self.name, teachers=without_teachers(self.name, config))]

    def setup(self, ctx):
        self.keys = [ctx.tap("student", layer) for layer in self.exits]
        self.deep_key = ctx.tap("student", self.feature_layer) if self.feature_layer else None
        outputs = ctx.dry_run()
        classes = outputs.student.shape[-1]
        width = pooled(outputs.features[self.deep_key]).flatten(1).shape[1] if self.deep_key else 128
        for index, key in enumerate(self.keys):
            features = pooled(outputs.features[key]).flatten(1)
            ctx.add_module(f"exit{index}", ExitHead(features.shape[1], width, classes))

    def losses(self, batch, outputs, ctx):
        final = outputs.student
        terms = {"ce": cross_entropy(final, batch.labels, ctx, method=self.name)}
        exit_ce, exit_kd, exit_hint = 0.0, 0.0, 0.0
        target = final.detach()
        deep = pooled(outputs.features[self.deep_key]).flatten(1).detach().float() if self.deep_key else None
        for index, key in enumerate(self.keys):
            logits, hidden = ctx.modules[f"exit{index}"](outputs.features[key].float())
            exit_ce = exit_ce + cross_entropy(logits, batch.labels, ctx, method=self.name)
            exit_kd = exit_kd + kdcore.kd_loss(logits, target, temperature=self.temperature, t2_scale=self.t2_scale,
                                               labels=batch.labels, ignore_index=ctx.ignore_index,
                                               normalizer=ctx.normalizer)
            if deep is not None:
                exit_hint = exit_hint + ctx.per_example((hidden - deep).square().sum())
        terms.update(exit_ce=exit_ce, exit_kd=exit_kd)
        if deep is not None:
            terms["exit_hint"] = exit_hint
        return terms


@kdcore.hookimpl
def kdcore_register_methods(register):
    register("byot", BeYourOwnTeacher, description="Zhang et al. 2019: the network's deepest output teaches "
                                                   "classifiers on its shallower layers")
