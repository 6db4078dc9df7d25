"""BERT text encoder (post-LayerNorm), with all-MiniLM-L6-v2 as the default.

Inputs are token dicts {"input_ids", "attention_mask", "token_type_ids"?}
of int32 [B, L] (see `jtl.models.text.tokenize`). What the head sees
(`pool`): by default "mean", the last hidden states mean-pooled over the
attention mask, as sentence-transformers does; "cls_pooler", transformers'
`pooler_output` tanh(pooler(the [CLS] state)), what
`BertForSequenceClassification`'s classifier reads (set it to load or export
such a task model whole). `embed` L2-normalises the features, which for
all-MiniLM-L6-v2 (mean) is what it returns. The head (`num_classes > 0`) is a
Dense on the features.

Parameter paths: "embeddings/word_embeddings/embedding",
"embeddings/layer_norm/scale", "layer_0/attention/query/kernel",
"layer_0/attention_norm/scale", "layer_0/intermediate/kernel",
"layer_0/output/kernel", "layer_0/output_norm/scale", ..., "head/kernel".
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jtl.errors import ConfigError, DataError
from jtl.models import registry, text, wgrad
from jtl.models.remat import can_scan, scan_blocks


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Sizes of a BERT encoder (defaults: all-MiniLM-L6-v2)."""
  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  dropout: float = 0.1
  attention_dropout: float = 0.1


MINILM_L6 = BertConfig()
POOLS = ("mean", "cls_pooler")
BERT_BASE = BertConfig(hidden_size=768, num_layers=12, num_heads=12,
                       intermediate_size=3072)


def _check_inputs(x: Any) -> None:
  if not isinstance(x, Mapping) or "input_ids" not in x or "attention_mask" not in x:
    found = sorted(x) if isinstance(x, Mapping) else type(x).__name__
    raise DataError(
        "BERT expects a dict with 'input_ids' and 'attention_mask' (int32 "
        f"[batch, length]), optionally 'token_type_ids'; found {found}. "
        "Use jtl.models.text.tokenize to build it.")


def _check_ranges(x: Mapping[str, Any], c: BertConfig) -> None:
  """Refuses a sequence longer than the position table (its shape, at trace
  time) and, when the ids are concrete (not traced), ids outside the
  embedding tables: a lookup past a table's end gives NaN for the batch."""
  length = np.shape(x["input_ids"])[-1]
  if length > c.max_position:
    raise DataError(
        f"input_ids has {length} tokens per row but the model has {c.max_position} "
        "positions (max_position_embeddings); tokenise with max_length <= "
        f"{c.max_position} (config key max_length).")
  tables = (("input_ids", c.vocab_size, "vocab_size"),
            ("token_type_ids", c.type_vocab_size, "type_vocab_size"))
  for key, size, name in tables:
    value = x.get(key)
    if value is None or isinstance(value, jax.core.Tracer):
      continue
    ids = np.asarray(value)
    bad = np.argwhere((ids < 0) | (ids >= size))
    if bad.size:
      where = tuple(int(i) for i in bad[0])
      raise DataError(
          f"{key}{list(where)} = {int(ids[where])} is outside the model's {name} {size} "
          f"({len(bad)} ids out of range); tokenise with the model's own tokenizer "
          "(spec.preprocess or spec.tokenizer_file()).")


class Embeddings(nn.Module):
  """Word + position + token-type embeddings, then LayerNorm and dropout."""
  config: BertConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array, *,
               train: bool) -> jax.Array:
    c = self.config
    length = input_ids.shape[1]
    words = wgrad.Embed(c.vocab_size, c.hidden_size, name="word_embeddings")(input_ids)
    positions = wgrad.Embed(c.max_position, c.hidden_size,
                         name="position_embeddings")(jnp.arange(length)[None, :])
    types = wgrad.Embed(c.type_vocab_size, c.hidden_size,
                     name="token_type_embeddings")(token_type_ids)
    x = words + positions + types
    x = nn.LayerNorm(epsilon=c.layer_norm_eps, name="layer_norm")(x)
    return nn.Dropout(c.dropout)(x, deterministic=not train)


class SelfAttention(nn.Module):
  """Multi-head self-attention over the unmasked keys, then the output Dense."""
  config: BertConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, *, train: bool) -> jax.Array:
    c = self.config
    batch, length, _ = x.shape
    head_dim = c.hidden_size // c.num_heads

    def split(name):
      y = wgrad.Dense(c.hidden_size, name=name)(x)
      return y.reshape(batch, length, c.num_heads, head_dim)

    q, k, v = split("query"), split("key"), split("value")
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim).astype(np.float32)
    keep = mask[:, None, None, :].astype(bool)
    scores = jnp.where(keep, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = nn.Dropout(c.attention_dropout)(probs, deterministic=not train)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, length, c.hidden_size)
    return wgrad.Dense(c.hidden_size, name="output")(out)


class Layer(nn.Module):
  """One post-LayerNorm transformer layer (attention, then GELU MLP)."""
  config: BertConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, train: bool) -> jax.Array:
    # train positional: it is nn.remat's static argument when Bert.remat is set
    c = self.config
    y = SelfAttention(c, name="attention")(x, mask, train=train)
    y = nn.Dropout(c.dropout)(y, deterministic=not train)
    x = nn.LayerNorm(epsilon=c.layer_norm_eps, name="attention_norm")(x + y)
    y = wgrad.Dense(c.intermediate_size, name="intermediate")(x)
    y = nn.gelu(y, approximate=False)
    y = wgrad.Dense(c.hidden_size, name="output")(y)
    y = nn.Dropout(c.dropout)(y, deterministic=not train)
    return nn.LayerNorm(epsilon=c.layer_norm_eps, name="output_norm")(x + y)


class Bert(nn.Module):
  """BERT encoder, its pooled features and an optional classification head.

  Attributes:
    num_classes: size of the head; 0 returns the pooled features.
    config: encoder sizes (default all-MiniLM-L6-v2).
    with_pooler: keep `BertModel`'s [CLS] pooler (Dense + tanh, params
      "pooler/..."), so that it is loaded from and exported with the weights
      (transformers finds it); `pooled` computes it. With pool="mean" the
      features never use it. False for a checkpoint without one.
    pool: what `features` (and so the head) sees: "mean" (the token states
      mean-pooled over the attention mask) or "cls_pooler" (`pooled`:
      tanh(pooler(the [CLS] state)), as transformers'
      `BertForSequenceClassification`; needs with_pooler). Settable from a
      config as model_kwargs={"pool": "cls_pooler"}.
    remat: gradient checkpointing of every layer: its activations are
      recomputed in the backward pass instead of kept (less memory, one more
      forward pass; same params, and the same gradients without dropout; the
      layers run as one checkpointed scan in training, `jtl.models.remat`).
  """
  num_classes: int = 0
  config: BertConfig = MINILM_L6
  with_pooler: bool = True
  pool: str = "mean"
  remat: bool = False

  def setup(self):
    if self.pool not in POOLS:
      raise ConfigError(f"Bert.pool must be one of {POOLS}; found {self.pool!r} (set it "
                        "with model_kwargs={'pool': ...}).")
    if self.pool == "cls_pooler" and not self.with_pooler:
      raise ConfigError("Bert pool='cls_pooler' reads the [CLS] pooler, but with_pooler=False; "
                        "keep with_pooler=True (the default) or use pool='mean'.")
    self.embeddings = Embeddings(self.config)
    layer = nn.remat(Layer, static_argnums=(3,)) if self.remat else Layer  # 3: train
    self.layers = [layer(self.config, name=f"layer_{i}")
                   for i in range(self.config.num_layers)]
    self.head_dropout = nn.Dropout(self.config.dropout)
    if self.with_pooler:
      self.pooler = wgrad.Dense(self.config.hidden_size)
    if self.num_classes:
      self.head = wgrad.Dense(self.num_classes)

  def hidden_states(self, x: Mapping[str, Any], *, train: bool = False) -> jax.Array:
    """Last-layer token states, float32 [B, L, hidden]."""
    _check_inputs(x)
    _check_ranges(x, self.config)
    ids = jnp.asarray(x["input_ids"], jnp.int32)
    mask = jnp.asarray(x["attention_mask"], jnp.int32)
    types = x.get("token_type_ids")
    types = jnp.zeros_like(ids) if types is None else jnp.asarray(types, jnp.int32)
    h = self.embeddings(ids, types, train=train)
    scanned = self._scanned(h, mask, train) if self.remat else None
    if scanned is not None:
      return scanned
    for layer in self.layers:
      h = layer(h, mask, train)
    return h

  def _scanned(self, h: jax.Array, mask: jax.Array, train: bool) -> jax.Array | None:
    """The layers as one checkpointed scan (`jtl.models.remat`), or None."""
    if not can_scan(self, train):
      return None
    c = self.config
    random = c.dropout > 0 or c.attention_dropout > 0
    return scan_blocks(Layer(c, parent=None), [f"layer_{i}" for i in range(c.num_layers)],
                       self.variables, h, mask, train,
                       rng=self.make_rng("dropout") if random else None)

  def pooled(self, x: Mapping[str, Any], *, train: bool = False) -> jax.Array:
    """transformers' `pooler_output`: tanh(Dense(the [CLS] token's state))."""
    return jnp.tanh(self.pooler(self.hidden_states(x, train=train)[:, 0]))

  def features(self, x: Mapping[str, Any], *, train: bool = False) -> jax.Array:
    """What the head sees (see `pool`), float32 [B, hidden]: the mean of the
    token states over the attention mask, or the [CLS] pooler output."""
    if self.pool == "cls_pooler":
      return self.pooled(x, train=train)
    h = self.hidden_states(x, train=train)
    if self.with_pooler and self.is_initializing():
      self.pooler(h[:, 0])  # creates its params (the forward pass never uses it)
    mask = jnp.asarray(x["attention_mask"], h.dtype)[:, :, None]
    total = jnp.sum(h * mask, axis=1)
    count = jnp.maximum(jnp.sum(mask, axis=1), 1e-9)
    return total / count

  def embed(self, x: Mapping[str, Any], *, train: bool = False) -> jax.Array:
    """Sentence embeddings: the features L2-normalised, [B, hidden]."""
    f = self.features(x, train=train)
    norm = jnp.linalg.norm(f, axis=-1, keepdims=True)
    return f / jnp.maximum(norm, 1e-12)

  def __call__(self, x: Mapping[str, Any], *, train: bool = False) -> jax.Array:
    f = self.features(x, train=train)
    if not self.num_classes:
      return f.astype(jnp.float32)
    f = self.head_dropout(f, deterministic=not train)
    return self.head(f).astype(jnp.float32)


# Hugging Face BertModel names -> ours. Keys may carry a "bert." prefix (task
# models) or "0.auto_model." (a saved SentenceTransformer).
_PREFIXES = ("bert.", "0.auto_model.", "auto_model.", "model.")
_DROPPED = re.compile(r"embeddings\.position_ids")
_RULES = [
    (r"embeddings\.(word|position|token_type)_embeddings\.weight",
     r"embeddings/\1_embeddings/embedding"),
    (r"embeddings\.LayerNorm\.(weight|gamma)", "embeddings/layer_norm/scale"),
    (r"embeddings\.LayerNorm\.(bias|beta)", "embeddings/layer_norm/bias"),
    (r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.(weight|bias)",
     r"layer_\1/attention/\2/\3"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)",
     r"layer_\1/attention/output/\2"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.(weight|bias|gamma|beta)",
     r"layer_\1/attention_norm/\2"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)",
     r"layer_\1/intermediate/\2"),
    (r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"layer_\1/output/\2"),
    (r"encoder\.layer\.(\d+)\.output\.LayerNorm\.(weight|bias|gamma|beta)",
     r"layer_\1/output_norm/\2"),
    (r"pooler\.dense\.(weight|bias)", r"pooler/\1"),
    (r"classifier\.(weight|bias)", r"head/\1"),
]
_LEAF = {"gamma": "scale", "beta": "bias"}


def convert_torch(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Maps a Hugging Face `BertModel` state dict to flat "params/..." paths.

  Linear weights (out, in) become kernels (in, out); LayerNorm weight/gamma
  becomes "scale"; the pooler becomes "pooler/kernel" and "pooler/bias";
  `position_ids` is dropped. Keys it does not know are passed through unchanged so
  that a strict load reports them.

  >>> out = convert_torch({"encoder.layer.0.attention.self.query.weight":
  ...                      np.zeros((4, 3), np.float32)})
  >>> {k: v.shape for k, v in out.items()}
  {'params/layer_0/attention/query/kernel': (3, 4)}
  """
  out: dict[str, np.ndarray] = {}
  for key, value in state_dict.items():
    name = key
    for prefix in _PREFIXES:
      if name.startswith(prefix):
        name = name[len(prefix):]
        break
    if _DROPPED.fullmatch(name):
      continue
    value = np.asarray(value)
    for pattern, target in _RULES:
      m = re.fullmatch(pattern, name)
      if m is None:
        continue
      path = m.expand(target)
      head, leaf = path.rsplit("/", 1)
      if leaf == "weight" and not head.endswith("norm"):
        out[f"params/{head}/kernel"] = value.T
      elif leaf == "weight":
        out[f"params/{head}/scale"] = value
      else:
        out[f"params/{head}/{_LEAF.get(leaf, leaf)}"] = value
      break
    else:
      out[key] = value
  return out


def example_input(batch_size: int) -> dict[str, np.ndarray]:
  """A tiny token batch of the right dtypes for `init`."""
  ids = np.zeros((batch_size, 8), np.int32)
  ids[:, 0], ids[:, 1] = 101, 102
  mask = np.zeros((batch_size, 8), np.int32)
  mask[:, :2] = 1
  return {"input_ids": ids, "attention_mask": mask,
          "token_type_ids": np.zeros((batch_size, 8), np.int32)}


def preprocess_minilm(texts: str | Sequence[str], *,
                      max_length: int | None = None) -> dict[str, np.ndarray]:
  """Tokenises texts with the all-MiniLM-L6-v2 tokenizer, trimmed of padding.

  The tokenizer file pads and truncates to 128 tokens; `max_length` changes
  that.
  """
  tokenizer = text.load_tokenizer(text.minilm_dir(), max_length=max_length,
                                  max_position=MINILM_L6.max_position)
  return text.trim_padding(text.tokenize(tokenizer, texts))



def text_config(spec: registry.ModelSpec) -> BertConfig | None:
  """The `BertConfig` (vocab_size, max_position, ...) a text model's spec
  builds, or None when its module is not a BERT."""
  config = getattr(spec.build(num_classes=0), "config", None)
  return config if isinstance(config, BertConfig) else None


def groups(num_layers: int) -> list[tuple[str, str]]:
  """Layer groups bottom to top: embeddings, layer_0..layer_{n-1}, pooler, head."""
  return ([("embeddings", r"embeddings/.*")]
          + [(f"layer_{i}", rf"layer_{i}/.*") for i in range(num_layers)]
          + [("pooler", r"pooler/.*"), ("head", r"head/.*")])


# Layer-wise learning-rate decay trains the pooler at the head's rate.
HEAD_LEVEL = ("pooler",)


def built_groups(params: Mapping[str, Any]) -> list[tuple[str, str]]:
  """`groups` of a BERT as built (model_kwargs may give it another config)."""
  return groups(registry.numbered(params, "layer_"))


registry.register(registry.ModelSpec(
    name="minilm_l6",
    build=lambda num_classes=0, **kw: Bert(num_classes=num_classes, **kw),
    example_input=example_input,
    preprocess=preprocess_minilm,
    tokenizer_file=lambda: text.minilm_dir() / "tokenizer.json",
    groups=groups(MINILM_L6.num_layers), groups_of=built_groups, head_level=HEAD_LEVEL,
    pretrained="minilm_l6/sentence",
    converter=convert_torch,
    default_num_classes=0,
    input_kind="text",
))
