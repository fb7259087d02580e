"""The ``fitnets`` method: Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015).

At each named pair of layers, a trainable regressor maps the student's features (the "guided"
layer) onto the teacher's (the "hint" layer), and the squared error between them is minimized,
together with response KD on the outputs. Regressors are linear layers over the last dimension
(``[N, D]``, or sequences ``[N, L, D]``), or 1×1 convolutions for spatial maps ``[N, C, H, W]``;
student and teacher features must have the same positions (height and width, or sequence length).
Regressors are sized from a dry run, trained with the student, checkpointed, and dropped after
training. Features are read with
forward hooks, the models are not edited. By default hints and outputs train jointly (one stage,
``fitnets``); ``hint_epochs`` > 0 follows the paper instead: a stage ``hints`` of hint-only
training, then a stage ``distill`` of response KD that continues from its student.

Config keys: ``hints`` (required: ``[[student_layer, teacher_layer], ...]``, submodule paths such
as ``"layer2"`` or ``"body.1"``), ``hint_weight`` (default 1.0: per example, the mean squared error
over the feature's elements, summed over pairs), ``hint_epochs`` (default 0), and the response-KD
keys ``temperature``, ``divergence`` or ``loss``, ``beta``, ``alpha``, ``kd_weight``, ``ce_weight``.
"""

from __future__ import annotations

import kdcore
from kdcore.engine.method import options_of
from kdcore_plugins.common import RESPONSE_DEFAULTS, ResponseTerms, layer_pairs, linear_for, positions, width


class FitNets(kdcore.Method):
    name = "fitnets"

    def __init__(self, config):
        super().__init__(config)
        options = options_of(self.name, self.config, hints=None, hint_weight=1.0, hint_epochs=0, **RESPONSE_DEFAULTS)
        self.hints = layer_pairs(self.name, options["hints"], "hints")
        self.hint_epochs = int(options["hint_epochs"])
        if self.hint_epochs < 0:
            raise ValueError(f"fitnets: hint_epochs must be >= 0, got {self.hint_epochs}")
        self.response = ResponseTerms(self.name, self.config, options)
        self.default_weights = {**self.response.weights, "hint": float(options["hint_weight"])}

    def plan(self, config):
        if not self.hint_epochs:
            return [kdcore.Stage(self.name)]
        return [kdcore.Stage("hints", epochs=self.hint_epochs), kdcore.Stage("distill", student="previous")]

    def setup(self, ctx):
        if not ctx.teachers:
            raise ValueError("fitnets needs a teacher: list one under teachers in the run config")
        if ctx.stage.name == "distill":
            return
        self.keys = [(ctx.tap("student", s), ctx.tap("teacher0", t)) for s, t in self.hints]
        features = ctx.dry_run().features
        for index, (student_key, teacher_key) in enumerate(self.keys):
            student, teacher = features[student_key], features[teacher_key]
            if student.dim() != teacher.dim() or positions(student) != positions(teacher):
                raise ValueError(f"fitnets: hint pair {list(self.hints[index])} has student features "
                                 f"{tuple(student.shape[1:])} and teacher features {tuple(teacher.shape[1:])}; "
                                 "they must have the same positions (spatial size or sequence length)")
            ctx.add_module(f"regressor{index}", linear_for(student, width(teacher)))

    def losses(self, batch, outputs, ctx):
        if ctx.stage.name == "distill":
            return self.response(outputs.student, outputs.teachers[0], batch, ctx)
        hint = 0.0
        for index, (student_key, teacher_key) in enumerate(self.keys):
            guided = ctx.modules[f"regressor{index}"](outputs.features[student_key].float())
            error = (guided - outputs.features[teacher_key].float()).square()
            hint = hint + error.flatten(1).mean(1).sum()
        terms = {"hint": ctx.per_example(hint)}
        if ctx.stage.name == self.name:
            terms.update(self.response(outputs.student, outputs.teachers[0], batch, ctx))
        return terms


@kdcore.hookimpl
def kdcore_register_methods(register):
    register("fitnets", FitNets, description="Romero et al. 2015: regress the teacher's intermediate features")
