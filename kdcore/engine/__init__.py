"""The distillation engine: what method plugins describe (stages, loss terms) and what runs it."""

from kdcore.engine.method import Method, Outputs, Stage

__all__ = ["Method", "Outputs", "Stage"]
