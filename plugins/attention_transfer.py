"""The ``attention_transfer`` method: Zagoruyko & Komodakis, "Paying More Attention to
Attention" (ICLR 2017), activation-based attention.

A layer's attention map is the mean over channels of its squared activations, flattened and
L2-normalized; the student matches the teacher's map at each named pair of layers. There are no
parameters, so the maps must have the same number of positions: pixels of ``[N, C, H, W]`` maps,
tokens of ``[N, L, D]`` sequences, or the D units of ``[N, D]`` features. The term is the squared
distance between normalized maps, averaged over positions and summed over pairs, weighted by
``beta / 2`` as in the paper; the labels' cross-entropy and (optionally) response KD are added.

Config keys: ``layers`` (required: ``[[student_layer, teacher_layer], ...]``), ``beta`` (default
1000, the attention term's weight), ``ce_weight`` (default 1.0), ``kd_weight`` (default 0: no
output term), ``temperature`` (default 4.0), ``divergence`` (default ``"forward_kl"``) or ``loss``
(any registered loss).
"""

from __future__ import annotations

import torch.nn.functional as F

import kdcore
from kdcore.engine.method import options_of
from kdcore_plugins.common import ResponseTerms, layer_pairs


def attention_map(features):
    """Σ_c A_c² / C over channels (dim 1 of ``[N, C, H, W]``, the last of ``[N, L, D]``; ``[N, D]``
    is its own map), flattened and L2-normalized per example."""
    energy = features.float().pow(2)
    if energy.dim() == 4:
        energy = energy.mean(1)
    elif energy.dim() == 3:
        energy = energy.mean(-1)
    return F.normalize(energy.flatten(1), dim=1)


class AttentionTransfer(kdcore.Method):
    name = "attention_transfer"

    def __init__(self, config):
        super().__init__(config)
        options = options_of(self.name, self.config, layers=None, beta=1000.0, ce_weight=1.0, kd_weight=0.0,
                             temperature=4.0, loss=None, divergence="forward_kl")
        self.pairs = layer_pairs(self.name, options["layers"])
        if float(options["kd_weight"]) == 0 and any(key in self.config for key in ("loss", "divergence", "temperature")):
            chosen = ", ".join(key for key in ("loss", "divergence", "temperature") if key in self.config)
            raise ValueError(f"attention_transfer: {chosen} shape(s) the output term, which is off (kd_weight: 0, "
                             "the default); set kd_weight > 0 to use it, or remove it")
        response_keys = ("temperature", "loss", "divergence", "kd_weight", "ce_weight")  # beta weighs the maps
        self.response = ResponseTerms(self.name, self.config, {key: options[key] for key in response_keys})
        self.default_weights = {**self.response.weights, "attention": float(options["beta"]) / 2}

    def setup(self, ctx):
        if not ctx.teachers:
            raise ValueError("attention_transfer needs a teacher: list one under teachers in the run config")
        self.keys = [(ctx.tap("student", s), ctx.tap("teacher0", t)) for s, t in self.pairs]
        features = ctx.dry_run().features
        for pair, (s, t) in zip(self.pairs, self.keys):
            a, b = attention_map(features[s]), attention_map(features[t])
            if a.shape[1] != b.shape[1]:
                raise ValueError(f"attention_transfer: layers {list(pair)} give attention maps of {a.shape[1]} and "
                                 f"{b.shape[1]} positions; pick layers with the same spatial size")

    def losses(self, batch, outputs, ctx):
        total = 0.0
        for s, t in self.keys:
            difference = attention_map(outputs.features[s]) - attention_map(outputs.features[t])
            total = total + difference.pow(2).mean(1).sum()
        terms = {"attention": ctx.per_example(total)}
        response = self.response(outputs.student, outputs.teachers[0], batch, ctx)
        return terms | {name: value for name, value in response.items() if self.default_weights[name] > 0}


@kdcore.hookimpl
def kdcore_register_methods(register):
    register("attention_transfer", AttentionTransfer,
             description="Zagoruyko & Komodakis 2017: match normalized activation-attention maps")
