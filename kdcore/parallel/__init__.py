"""Scale-out: models sharded with FSDP2 and their sharded checkpoints, for the engine
(:mod:`kdcore.parallel.fsdp`, :mod:`kdcore.parallel.sharded_checkpoint`), and the
vocabulary-parallel distillation loss (:func:`vocab_parallel_kd_loss`).

Imported only by what uses it (it loads ``torch.distributed``); ``import kdcore`` does not.
"""

from kdcore.parallel.vocab_parallel import vocab_parallel_kd_loss

__all__ = ["vocab_parallel_kd_loss"]
