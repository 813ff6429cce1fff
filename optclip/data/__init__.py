"""Data for the experiments: the paper's data sets when present locally, offline defaults
otherwise. Nothing here ever downloads.

Each source returns its examples and an ``info`` dict (source, size, content hash) that the
experiments record in their config so results are traceable.
"""

from optclip.data.batching import (bucket_length, fixed_masks, fixed_subset, lm_blocks, pad_batch,
                                   prefetch, translation_batch)
from optclip.data.common import DataNotFound, content_hash
from optclip.data.tokenization import SPECIAL_TOKENS, train_tokenizer

__all__ = ["DataNotFound", "SPECIAL_TOKENS", "bucket_length", "content_hash", "fixed_masks",
           "fixed_subset", "lm_blocks", "pad_batch", "prefetch", "train_tokenizer",
           "translation_batch"]
