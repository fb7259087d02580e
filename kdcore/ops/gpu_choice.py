"""Which kdcore backend ``backend="auto"`` uses on CUDA tensors, by measurement.

Both GPU backends implement the same contract; which one is faster depends on the dtype, the
divergence and the vocabulary size (the Triton kernel holds rows up to 4 096 columns in registers
and sweeps longer ones in tiles; the CUDA kernel splits a row over a thread-block cluster). ``MEASURED`` maps
``(dtype, divergence, vocabulary bucket)`` to the backend that won ``python -m benchmarks.kd_loss
--divergences all`` on the GPU named in ``MEASURED_ON``; a problem it does not cover falls back to
the backend priorities (``cuda`` before ``triton``).

To refresh it, run the benchmark on the target GPU and record, per problem, the faster of
``kdcore-cuda`` and ``kdcore-triton``.
"""

from __future__ import annotations

import torch

from kdcore import plugins
from kdcore._compile import constant_result

# Upper bounds of the vocabulary buckets: a problem falls in the first bucket that holds its V.
VOCAB_BUCKETS = (32768, 131072, 262144, 1 << 62)

# No GPU measurement has been recorded yet; see the module docstring.
MEASURED_ON: str | None = None
MEASURED: dict[tuple[str, str, int], str] = {}


def bucket(vocab: int) -> int:
    return next(b for b in VOCAB_BUCKETS if vocab <= b)


@constant_result
def fastest(dtype: torch.dtype, divergence: int, vocab: int) -> str:
    """The measured-fastest available backend for this problem on CUDA, or "auto" (priorities)."""
    name = next(spec.name for spec in _divergences() if spec.code == divergence)
    choice = MEASURED.get((str(dtype).removeprefix("torch."), name, bucket(vocab)))
    if choice is None or plugins.host().backends.reason(choice) is not None:
        return "auto"
    return choice


def _divergences():
    from kdcore.divergences import DIVERGENCES

    return DIVERGENCES.values()
