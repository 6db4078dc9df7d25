"""Pretrained checkpoints: read any format, merge into a model, export."""

from jtl.checkpoint.readers import read
from jtl.checkpoint.sources import register_source, resolve
