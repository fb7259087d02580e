"""Registered losses in method configs.

A logit-level method's config chooses its distillation loss with ``loss: NAME`` (or ``loss: {name:
NAME, option: value, ...}`` with the loss's own options): any loss a plugin registered through
``kdcore_register_losses``, kdcore's divergences included, or an import path ``module:function``.
The older key ``divergence: NAME`` chooses one of :func:`kdcore.kd_loss`'s divergences the same way;
setting both is an error. :class:`NamedLoss` calls the chosen loss by the contract the hook's
docstring states (:mod:`kdcore.hookspecs`), and :func:`reduce_rows` is that contract's reduction,
for loss authors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from kdcore import _checks, plugins
from kdcore.divergences import DIVERGENCES
from kdcore.engine.config import resolve

#: what every call passes, besides the logits (the method's ``temperature``, the run's labels)
ROW_OPTIONS = ("labels", "ignore_index", "temperature", "reduction", "normalizer")
#: the method keys passed on to the loss when the config sets them: kd_loss's mixing weights
PASSED_KEYS = ("beta", "alpha")


@dataclass(frozen=True)
class NamedLoss:
    """A registered loss with the options a method's config gives it; ``key`` is the config key
    that chose it (``"loss"`` or ``"divergence"``), for messages."""

    name: str
    fn: Callable[..., torch.Tensor]
    options: Mapping[str, Any]
    key: str = "loss"

    @property
    def divergence(self) -> str | None:
        """The :func:`kdcore.kd_loss` divergence this loss is, or None. Paths that never
        materialize dense logits (fused LM heads, top-k cached teachers) run only these."""
        return self.name if self.name in DIVERGENCES else None

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, labels: torch.Tensor | None,
                 ignore_index: int, temperature: float, normalizer: float | torch.Tensor | None) -> torch.Tensor:
        """The loss of one micro-batch, ``reduction="batchmean"`` with the engine's ``normalizer``;
        an exception in a plugin's loss names that plugin (:class:`kdcore.plugins.PluginFault`)."""
        host = plugins.host()
        with host.blame(host.losses, self.name, "losses"):
            return self._call(student_logits, teacher_logits, labels=labels, ignore_index=ignore_index,
                              temperature=temperature, normalizer=normalizer)

    def check(self, method: str, temperature: float) -> None:
        """Calls the loss once on small CPU logits, as a training step does, so that an option it
        rejects (a ``TypeError`` or ``ValueError``) fails now, as a config error, instead of at the
        first step; the result must be the reduced loss, differentiable in the student logits."""
        _checks.positive(method, "temperature", temperature)
        student = torch.linspace(-2.0, 2.0, 16).reshape(2, 8).requires_grad_()
        teacher = torch.linspace(1.0, -1.0, 16).reshape(2, 8)
        host = plugins.host()
        try:
            with torch.enable_grad(), host.blame(host.losses, self.name, "its check at config time",
                                                 passes=(TypeError, ValueError)):
                value = self._call(student, teacher, labels=torch.tensor([3, 5]), ignore_index=-100,
                                   temperature=temperature, normalizer=None)
        except (TypeError, ValueError) as exc:
            given = ", ".join(f"{key}={value!r}" for key, value in self.options.items()) or "a call without options"
            raise ValueError(f"{method}: {self.key} {self.name!r} rejects {given}: {exc}") from None
        if not (isinstance(value, torch.Tensor) and value.dim() == 0 and value.requires_grad):
            got = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{method}: loss {self.name!r} returned {got}, not the reduced loss (a scalar tensor "
                             "differentiable in student_logits) that a registered loss returns")

    def _call(self, student_logits, teacher_logits, **row) -> torch.Tensor:
        return self.fn(student_logits, teacher_logits, reduction="batchmean", **row, **self.options)


def chosen_loss(method: str, config: Mapping[str, Any], options: Mapping[str, Any]) -> NamedLoss:
    """The loss a method's config chooses, by name: ``config`` is the method's section as the run
    config sets it, ``options`` the same completed with the method's defaults, with ``loss`` (None
    when unset), ``divergence``, and ``beta`` / ``alpha`` where the method has them. Every key of
    ``options`` is the method's own, so none can be a loss option too. Call
    :meth:`NamedLoss.check` next, with the method's temperature."""
    spec = options["loss"]
    passed = {key: config[key] for key in PASSED_KEYS if key in config and key in options}
    if spec is None:
        name = options["divergence"]
        if isinstance(name, str) and name not in DIVERGENCES and name in plugins.host().losses:
            raise ValueError(f"{method}: divergence {name!r} is a registered loss, not one of kd_loss's divergences; "
                             f"choose it with loss: {name}")
        _checks.choice(method, "divergence", name, DIVERGENCES)
        return NamedLoss(name, plugins.get_loss(name), passed, key="divergence")
    if "divergence" in config:
        raise ValueError(f"{method}: loss and divergence are both set; keep loss (divergence: NAME is the older "
                         "spelling of loss: NAME for kd_loss's divergences)")
    name, own = _loss_spec(method, spec)
    for key, value in own.items():
        if key in options:
            raise ValueError(f"{method}: loss.{key}: {key} is {method}'s own key; set it beside loss "
                             f"({key}: {value!r})")
        if key in ROW_OPTIONS:
            raise ValueError(f"{method}: loss.{key}: every loss receives {key} from the method; remove it from loss")
    return NamedLoss(name, resolve(name, plugins.host().losses, f"{method}: loss"), {**passed, **own})


def _loss_spec(method: str, spec: Any) -> tuple[str, dict[str, Any]]:
    """``(name, own options)`` of a ``loss`` value: a name, or ``{name: NAME, option: value, ...}``."""
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, Mapping) and isinstance(spec.get("name"), str):
        return spec["name"], {key: value for key, value in spec.items() if key != "name"}
    raise ValueError(f"{method}: loss must be a registered loss's name or a mapping {{name: NAME, option: value, "
                     f"...}}, got {spec!r}")


def reduce_rows(per_row: torch.Tensor, labels: torch.Tensor | None = None, *, ignore_index: int = -100,
                reduction: str = "batchmean", normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """A registered loss's reduction of its per-row values ``[...]``, as :func:`kdcore.kd_loss`
    reduces: rows labelled ``ignore_index`` are dropped (set to 0); ``"none"`` returns the rows,
    ``"sum"`` their sum, ``"batchmean"`` the sum divided by ``normalizer`` or, without one, by the
    number of kept rows (0 when none is kept)."""
    _checks.choice("reduce_rows", "reduction", reduction, ("none", "sum", "batchmean"))
    kept = None if labels is None else labels != ignore_index
    if kept is not None:
        per_row = per_row.masked_fill(~kept, 0)
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    if normalizer is None:
        normalizer = per_row.numel() if kept is None else kept.sum().clamp_min(1)
    return total / normalizer
