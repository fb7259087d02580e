"""Distillation between models whose tokenizers differ.

* :mod:`~kdcore.cross_tokenizer.vocabulary`: loading tokenizers, the text each token stands for,
  and the tokens two vocabularies share (:func:`shared_vocabulary`).
* :mod:`~kdcore.cross_tokenizer.alignment`: the spans of text both tokenizations agree on, and
  aligned dataset items (:func:`aligned_example`).
* :mod:`~kdcore.cross_tokenizer.losses`: ULD, the shared-vocabulary divergence and their hybrid on
  aligned spans (:func:`cross_tokenizer_kd_loss`, :func:`fused_linear_cross_tokenizer_kd_loss`).
* :mod:`~kdcore.cross_tokenizer.retokenize`: the student's own samples re-tokenized for the
  teacher, for on-policy training.
"""

from kdcore.cross_tokenizer.alignment import align_spans, aligned_example, cut_points, encode
from kdcore.cross_tokenizer.losses import LOSSES, cross_tokenizer_kd_loss, fused_linear_cross_tokenizer_kd_loss
from kdcore.cross_tokenizer.vocabulary import SharedVocabulary, load_tokenizer, shared_vocabulary, token_texts

__all__ = [
    "LOSSES",
    "SharedVocabulary",
    "align_spans",
    "aligned_example",
    "cross_tokenizer_kd_loss",
    "cut_points",
    "encode",
    "fused_linear_cross_tokenizer_kd_loss",
    "load_tokenizer",
    "shared_vocabulary",
    "token_texts",
]
