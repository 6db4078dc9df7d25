"""Input pipelines: TFDS datasets, image folders, arrays and text, as numpy batches.

Importing `jtl.data` registers jtl's local TFDS builders (e.g. "jtl_mnist5k").
"""

from __future__ import annotations

from jtl.data import builders
from jtl.data.device import prefetch_to_device
from jtl.data.images import PRESETS as NORMALIZE_PRESETS
from jtl.data.images import get_normalizer
from jtl.data.pipeline import BatchIterator, make_dataset
from jtl.data.sources import DatasetInfo, dataset_info, resolve_source
from jtl.data.text import load_tokenizer, rotten_tomatoes, tokenize

__all__ = [
    "BatchIterator",
    "DatasetInfo",
    "NORMALIZE_PRESETS",
    "builders",
    "dataset_info",
    "get_normalizer",
    "load_tokenizer",
    "make_dataset",
    "prefetch_to_device",
    "resolve_source",
    "rotten_tomatoes",
    "tokenize",
]
