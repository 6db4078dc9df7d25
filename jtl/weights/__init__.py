"""Weights in: read any format, merge into a model, adapt shapes.

`read` returns a flat {name: numpy array} dict from Orbax, msgpack, npz,
safetensors or PyTorch files (no torch needed, no pickled code run);
`load_pretrained` puts those arrays into a model's fresh variables and reports
what it did; `resolve` and `register_source` name where checkpoints come from,
including the Hugging Face Hub ("hf://<owner>/<name>[@rev]/<file>",
"hf-hub:<owner>/<name>", see `jtl.weights.hub`). Outputs go the other way in
`jtl.export`; a run's own checkpoints live in `jtl.checkpoint`.
"""

from __future__ import annotations

from jtl.weights import hub
from jtl.weights.adapt import adapt_input_conv, resize_pos_embed
from jtl.weights.hub import HubRef
from jtl.weights.loading import Entry, LoadReport, load_pretrained
from jtl.weights.readers import FORMATS, detect_format, read, tensor_names
from jtl.weights.sources import (
  cache_dir,
  download,
  list_sources,
  register_source,
  resolve,
)

__all__ = ["FORMATS", "Entry", "HubRef", "LoadReport", "adapt_input_conv", "cache_dir",
           "detect_format", "download", "hub", "list_sources", "load_pretrained", "read",
           "register_source", "resize_pos_embed", "resolve", "tensor_names"]
