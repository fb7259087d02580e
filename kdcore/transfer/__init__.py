"""The transfer report: what a student inherits from its teacher.

:func:`transfer_figures` computes the figures from logits (a pure function: accuracy, agreement,
KL and calibration, the share of the teacher's errors the student repeats against a baseline's,
and the per-class gap over the baseline against the teacher's per-class accuracy);
:func:`plot_report` draws them. ``kdcore report RUN_DIR --baseline RUN_DIR`` computes them for
finished runs (:mod:`kdcore.transfer.report`). Definitions: docs/transfer.md.
"""

from kdcore.transfer.figures import transfer_figures
from kdcore.transfer.plot import plot_report

__all__ = ["plot_report", "transfer_figures"]
