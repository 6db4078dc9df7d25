"""Pretrained checkpoints: read any format, merge into a model, export.

`read` returns a flat {name: numpy array} dict from Orbax, msgpack, npz,
safetensors or PyTorch files; `load_pretrained` puts those arrays into a
model's fresh variables and reports what it did; `export` writes params back
out; `resolve` and `register_source` name where checkpoints come from.
"""

from __future__ import annotations

from jtl.checkpoint.adapt import adapt_input_conv, resize_pos_embed
from jtl.checkpoint.export import export
from jtl.checkpoint.merge import Entry, LoadReport, load_pretrained
from jtl.checkpoint.readers import FORMATS, detect_format, read
from jtl.checkpoint.sources import (cache_dir, download, list_sources,
                                    register_source, resolve)
from jtl.checkpoint.manager import (CheckpointManager, export_orbax, restore_variables,
                                     select_step)
