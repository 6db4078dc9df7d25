"""The HF / timm layouts: where each jtl module path goes in a torch state dict.

Layouts ("bert", "bert_cls", "timm_vit", "timm_resnet", "dinov2", "dinov2_cls")
name the module paths that `jtl.export.peft` writes adapters under (and
`peft_import` reads them from):
`torch_module(layout, path)`, the names of the modules in the live torch
model. transformers >= 5 renames DINOv2's attention modules in memory
(`attention.q_proj` ... `attention.o_proj`, what PEFT saves adapters under)
and renames them back when saving (`attention.attention.query` ...
`attention.output.dense`, the published files): `saved_name` gives the
name in the files, which `to_torch_state_dict` writes.

`to_torch_state_dict` maps a jtl model's variables (adapters merged) to the
layout's tensors, every leaf or an error naming it; `layout_of` gives a zoo
module's layout.

>>> torch_module("bert", "layer_0/attention/query")
('encoder.layer.0.attention.self.query', 'linear')
>>> torch_module("timm_resnet", "layer2_0/downsample/conv")
('layer2.0.downsample.0', 'conv')
>>> torch_module("dinov2_cls", "Transformer/encoderblock_3/MultiHeadDotProductAttention_0/key")
('dinov2.encoder.layer.3.attention.k_proj', 'linear_heads')
>>> saved_name("dinov2", "encoder.layer.3.attention.k_proj")
'encoder.layer.3.attention.attention.key'
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from jtl import lora_layout
from jtl import tree as jtree
from jtl.errors import CheckpointError, ConfigError, bullet_list
from jtl.models import bert, dinov2, resnet, vit
from jtl.tree import PyTree

LAYOUTS = ("bert", "bert_cls", "timm_vit", "timm_resnet", "dinov2", "dinov2_cls")

# jtl module path -> (torch module path, kind). First match wins. Kinds:
# "linear" (kernel [*in, out] -> weight [out, prod(in)]), "linear_heads" (a
# Linear whose jtl kernel is [in, heads, head_dim]: weight [heads * head_dim,
# in]), "conv", "norm", "embed", "bn", "layerscale" (`lambda1`), "qkv" (timm's
# fused query/key/value).
_DINOV2_BLOCK = r"Transformer/encoderblock_(\d+)"
_DINOV2 = [
    (r"embedding", "embeddings.patch_embeddings.projection", "conv"),
    (rf"{_DINOV2_BLOCK}/LayerNorm_0", r"encoder.layer.\1.norm1", "norm"),
    (rf"{_DINOV2_BLOCK}/LayerNorm_1", r"encoder.layer.\1.norm2", "norm"),
    *((rf"{_DINOV2_BLOCK}/MultiHeadDotProductAttention_0/{jtl}",
       rf"encoder.layer.\1.attention.{jtl[0]}_proj", "linear_heads")
      for jtl in ("query", "key", "value")),
    (rf"{_DINOV2_BLOCK}/MultiHeadDotProductAttention_0/out", r"encoder.layer.\1.attention.o_proj",
     "linear"),
    (rf"{_DINOV2_BLOCK}/LayerScale_0", r"encoder.layer.\1.layer_scale1", "layerscale"),
    (rf"{_DINOV2_BLOCK}/LayerScale_1", r"encoder.layer.\1.layer_scale2", "layerscale"),
    (rf"{_DINOV2_BLOCK}/MlpBlock_0/Dense_0", r"encoder.layer.\1.mlp.fc1", "linear"),
    (rf"{_DINOV2_BLOCK}/MlpBlock_0/Dense_1", r"encoder.layer.\1.mlp.fc2", "linear"),
    (r"Transformer/encoder_norm", "layernorm", "norm"),
]
_DINOV2_TOP = {"cls": "embeddings.cls_token", "mask_token": "embeddings.mask_token",
               "pos_embedding": "embeddings.position_embeddings"}
_BERT = [
    (r"embeddings/(word|position|token_type)_embeddings", r"embeddings.\1_embeddings",
     "embed"),
    (r"embeddings/layer_norm", "embeddings.LayerNorm", "norm"),
    (r"layer_(\d+)/attention/(query|key|value)", r"encoder.layer.\1.attention.self.\2",
     "linear"),
    (r"layer_(\d+)/attention/output", r"encoder.layer.\1.attention.output.dense", "linear"),
    (r"layer_(\d+)/attention_norm", r"encoder.layer.\1.attention.output.LayerNorm", "norm"),
    (r"layer_(\d+)/intermediate", r"encoder.layer.\1.intermediate.dense", "linear"),
    (r"layer_(\d+)/output", r"encoder.layer.\1.output.dense", "linear"),
    (r"layer_(\d+)/output_norm", r"encoder.layer.\1.output.LayerNorm", "norm"),
    (r"pooler", "pooler.dense", "linear"),
]
_MODULES: dict[str, list[tuple[str, str, str]]] = {
    "bert": [*_BERT, (r"head", "classifier", "linear")],  # BertModel (+ head.safetensors)
    "bert_cls": [(p, "bert." + t, k) for p, t, k in _BERT]  # BertForSequenceClassification
                + [(r"head", "classifier", "linear")],
    "timm_vit": [
        (r"embedding", "patch_embed.proj", "conv"),
        (r"Transformer/encoderblock_(\d+)/LayerNorm_0", r"blocks.\1.norm1", "norm"),
        (r"Transformer/encoderblock_(\d+)/LayerNorm_1", r"blocks.\1.norm2", "norm"),
        (r"Transformer/encoderblock_(\d+)/MlpBlock_0/Dense_0", r"blocks.\1.mlp.fc1", "linear"),
        (r"Transformer/encoderblock_(\d+)/MlpBlock_0/Dense_1", r"blocks.\1.mlp.fc2", "linear"),
        (r"Transformer/encoderblock_(\d+)/MultiHeadDotProductAttention_0/out",
         r"blocks.\1.attn.proj", "linear"),
        (r"Transformer/encoderblock_(\d+)/MultiHeadDotProductAttention_0/(query|key|value)",
         r"blocks.\1.attn.qkv", "qkv"),
        (r"Transformer/encoder_norm", "norm", "norm"),
        (r"head", "head", "linear"),
    ],
    "timm_resnet": [
        (r"stem/conv", "conv1", "conv"), (r"stem/bn", "bn1", "bn"), (r"head", "fc", "linear"),
        (r"layer(\d+)_(\d+)/downsample/conv", r"layer\1.\2.downsample.0", "conv"),
        (r"layer(\d+)_(\d+)/downsample/bn", r"layer\1.\2.downsample.1", "bn"),
        (r"layer(\d+)_(\d+)/(conv\d)", r"layer\1.\2.\3", "conv"),
        (r"layer(\d+)_(\d+)/(bn\d)", r"layer\1.\2.\3", "bn"),
    ],
    "dinov2": _DINOV2,  # transformers Dinov2Model
    "dinov2_cls": [(p, "dinov2." + t, k) for p, t, k in _DINOV2]  # ...ForImageClassification
                  + [(r"head", "classifier", "linear")],
}
_TOP_LEVEL = {"timm_vit": {"cls": "cls_token", "pos_embedding": "pos_embed"},
              "dinov2": _DINOV2_TOP,
              "dinov2_cls": {k: "dinov2." + v for k, v in _DINOV2_TOP.items()}}
# In-memory module name -> the name transformers writes to (and reads from) files.
_SAVED_NAMES = {
    "dinov2": [*((rf"(.*\.attention)\.{n[0]}_proj", rf"\1.attention.{n}")
                 for n in ("query", "key", "value")),
               (r"(.*\.attention)\.o_proj", r"\1.output.dense")],
}
_SAVED_NAMES["dinov2_cls"] = _SAVED_NAMES["dinov2"]


def check_layout(layout: str) -> None:
  if layout not in LAYOUTS:
    raise ConfigError(f"Unknown export layout {layout!r}; expected one of {LAYOUTS}.")


def torch_module(layout: str, path: str) -> tuple[str, str] | None:
  """(torch module path, kind) of a jtl module path, or None if unmapped."""
  check_layout(layout)
  for pattern, target, kind in _MODULES[layout]:
    m = re.fullmatch(pattern, path)
    if m is not None:
      return m.expand(target), kind
  return None


def saved_name(layout: str, name: str) -> str:
  """The name a torch module has in the files (`save_pretrained`, the Hub)."""
  for pattern, target in _SAVED_NAMES.get(layout, ()):
    m = re.fullmatch(pattern, name)
    if m is not None:
      return m.expand(target)
  return name


def layout_of(module: Any) -> str:
  """The export layout of a jtl zoo module (LoRA wrappers are looked through)."""
  base = getattr(module, "base", module)
  if isinstance(base, bert.Bert):
    return "bert_cls" if base.num_classes and base.pool == "cls_pooler" else "bert"
  if isinstance(base, dinov2.Dinov2):
    if base.num_classes and base.pool != "cls_mean":
      raise ConfigError("transformers' Dinov2ForImageClassification puts its classifier on "
                        "[class token, mean patch token]; this Dinov2's head sees "
                        f"pool={base.pool!r}. Export a Dinov2 with pool='cls_mean' (or "
                        "num_classes=0 for the backbone alone, Dinov2Model).")
    return "dinov2_cls" if base.num_classes else "dinov2"
  if isinstance(base, vit.ViT):
    if base.pool != "tok" or base.representation_size:
      raise ConfigError("timm layout export needs a ViT with pool='tok' and no "
                        f"pre_logits; this one has pool={base.pool!r}, "
                        f"representation_size={base.representation_size}.")
    return "timm_vit"
  if isinstance(base, resnet.ResNet):
    return "timm_resnet"
  raise ConfigError(f"No HF/timm export layout for {type(base).__name__}; supported: "
                    "jtl.models.bert.Bert (HF BertModel / BertForSequenceClassification), "
                    "vit.ViT (timm VisionTransformer), resnet.ResNet (timm ResNet), "
                    "dinov2.Dinov2 (HF Dinov2Model / Dinov2ForImageClassification).")


def _linear_weight(kernel: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(kernel.reshape(-1, kernel.shape[-1]).T)


def _conv_weight(kernel: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.transpose(kernel, (3, 2, 0, 1)))


def _module_leaves(flat: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
  modules: dict[str, dict[str, np.ndarray]] = {}
  for path, value in flat.items():
    module, _, leaf = path.rpartition("/")
    modules.setdefault(module, {})[leaf] = np.asarray(value)
  return modules


def convert_module(kind: str, name: str, leaves: dict[str, np.ndarray],
                    out: dict[str, np.ndarray]) -> list[str]:
  """Adds one module's tensors; returns the leaves it does not know."""
  known = {"linear": ("kernel", "bias"), "linear_heads": ("kernel", "bias"),
           "conv": ("kernel", "bias"), "norm": ("scale", "bias"), "embed": ("embedding",),
           "bn": ("scale", "bias", "mean", "var"), "layerscale": ("scale",)}[kind]
  for leaf, value in leaves.items():
    if leaf not in known:
      continue
    if leaf == "kernel":
      out[f"{name}.weight"] = (_linear_weight(value) if kind == "linear" else
                               np.ascontiguousarray(value.reshape(value.shape[0], -1).T)
                               if kind == "linear_heads" else _conv_weight(value))
    elif kind == "layerscale":
      out[f"{name}.lambda1"] = value
    elif leaf == "bias":
      out[f"{name}.bias"] = value.reshape(-1)
    elif leaf in ("scale", "embedding"):
      out[f"{name}.weight"] = value
    elif leaf in ("mean", "var") and kind == "bn":
      out[f"{name}.running_{leaf}"] = value
  if kind == "bn":
    out[f"{name}.num_batches_tracked"] = np.zeros((), np.int64)
  return [leaf for leaf in leaves if leaf not in known]


def _fuse_qkv(modules: dict[str, dict[str, np.ndarray]], out: dict[str, np.ndarray],
              name: str, block: str) -> None:
  """q/k/v DenseGeneral kernels [width, heads, head_dim] -> timm's fused qkv."""
  parts = [modules.get(f"{block}/{n}", {}) for n in ("query", "key", "value")]
  if not all("kernel" in p and "bias" in p for p in parts):
    raise CheckpointError(f"{block}: query, key and value need a kernel and a bias "
                          "each to make timm's fused qkv.")
  out[f"{name}.weight"] = np.ascontiguousarray(np.concatenate(
      [p["kernel"].reshape(p["kernel"].shape[0], -1).T for p in parts]))
  out[f"{name}.bias"] = np.concatenate([p["bias"].reshape(-1) for p in parts])


def to_torch_state_dict(variables: PyTree, layout: str) -> dict[str, np.ndarray]:
  """jtl variables ({"params", "batch_stats"?}) -> the layout's state dict.

  Params must be plain (adapters merged: `lora_layout.merge_lora`).

  Raises:
    CheckpointError: a leaf the layout has no place for (all listed), or
      LoRA leaves still in the params.
  """
  check_layout(layout)
  flat = {p: np.asarray(v) for p, v in jtree.flatten(dict(variables)).items()}
  params = {p[len("params/"):]: v for p, v in flat.items() if p.startswith("params/")}
  stats = {p[len("batch_stats/"):]: v for p, v in flat.items() if p.startswith("batch_stats/")}
  other = [p for p in flat if not p.startswith(("params/", "batch_stats/"))]
  adapters = [p for p in params if re.fullmatch(lora_layout.LORA_LEAF, p)]
  if adapters:
    raise CheckpointError(f"{len(adapters)} LoRA leaves (e.g. {adapters[0]}) are still in "
                          "the params: merge them first (lora.merge_lora) or export "
                          "them with jtl.export.peft.")
  out: dict[str, np.ndarray] = {}
  top = _TOP_LEVEL.get(layout, {})
  problems = [f"{p}: not a params/batch_stats leaf" for p in other]
  modules = _module_leaves({k: v for k, v in params.items() if k not in top})
  for module, leaves in _module_leaves(stats).items():
    modules.setdefault(module, {}).update(leaves)
  fused = set()
  for module, leaves in sorted(modules.items()):
    mapped = torch_module(layout, module)
    if mapped is None:
      problems.append(f"{module}: no {layout} module for it (leaves {sorted(leaves)})")
      continue
    name, kind = mapped
    if kind == "qkv":
      if name not in fused:
        fused.add(name)
        _fuse_qkv(modules, out, name, module.rpartition("/")[0])
      continue
    problems += [f"{module}/{leaf}: unknown leaf for a {kind} module"
                 for leaf in convert_module(kind, name, leaves, out)]
  for leaf, name in top.items():
    if leaf in params:
      out[name] = params[leaf]
  if layout in _SAVED_NAMES:
    out = {f"{saved_name(layout, k.rpartition('.')[0])}.{k.rpartition('.')[2]}": v
           for k, v in out.items()}
  if problems:
    raise CheckpointError(f"Cannot write the {layout} layout:\n" + bullet_list(problems))
  return out
