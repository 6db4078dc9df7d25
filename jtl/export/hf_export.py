"""Fine-tuned weights out in the Hugging Face / timm layouts (no torch needed).

The inverse of the converters in `jtl.models.bert` / `jtl.models.hub_models`
/ `jtl.models.resnet` / `jtl.models.dinov2`: a jtl BERT becomes a
transformers `BertModel` (`model.safetensors` + `config.json` that
`AutoModel.from_pretrained` reads) or, with pool="cls_pooler" and a head,
`BertForSequenceClassification` (`classifier` on the [CLS] pooler output),
a jtl ViT / ResNet becomes timm's
`VisionTransformer` / `ResNet` state dict (`model.safetensors` + a timm Hub
`config.json`: architecture, model_args, num_classes, pretrained_cfg), a jtl
DINOv2 becomes transformers' `Dinov2Model` (no head) or
`Dinov2ForImageClassification` (a head on [class token, mean patch token],
as `classifier`) in the facebook/dinov2-* key layout. LoRA adapters are
merged into their kernels first. Every jtl leaf is mapped (an unmapped one is
an error naming it), and the result maps back through the forward converter
to the same arrays.

Layouts ("bert", "bert_cls", "timm_vit", "timm_resnet", "dinov2", "dinov2_cls") also
name the module paths that `jtl.export.peft` writes adapters under (and
`peft_import` reads them from):
`torch_module(layout, path)`, the names of the modules in the live torch
model. transformers >= 5 renames DINOv2's attention modules in memory
(`attention.q_proj` ... `attention.o_proj`, what PEFT saves adapters under)
and renames them back when saving (`attention.attention.query` ...
`attention.output.dense`, the published files): `saved_name` gives the
name in the files, which `to_torch_state_dict` writes.

Notes:
  * jtl's BERT keeps `BertModel`'s pooler as it was loaded (`pooler.dense`,
    which its mean-pooled features do not use), so `BertModel` finds it. A
    classification head on the mean-pooled features (pool="mean", the
    default; not HF's [CLS] pooler) goes to `head.safetensors` as
    `classifier.weight` [classes, hidden] / `classifier.bias`. A BERT with
    pool="cls_pooler" and a head is HF's `BertForSequenceClassification`
    ("bert_cls": the encoder under "bert.", the head as `classifier`), all in
    `model.safetensors`.
  * jtl's ViT MLP uses the tanh GELU of the published JAX models unless
    built with `exact_gelu=True` (timm / HF weights); timm's default is the
    erf GELU, so for a tanh-GELU ViT `config.json`'s model_args say
    `act_layer: "gelu_tanh"`, and `timm.create_model(arch, **model_args)`
    builds the same network.

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

import json
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from jtl import paths
from jtl import tree as jtree
from jtl import lora_layout
from jtl.errors import CheckpointError, ConfigError, bullet_list
from jtl.models import bert, dinov2, resnet, vit
from jtl.models.preprocessing import (IMAGE_PROCESSOR_FILE, Normalization,
                                     image_processor_config, unit_mean_std)
from jtl.tree import PyTree
from jtl.weights.adapt import resize_pos_embed

LAYOUTS = ("bert", "bert_cls", "timm_vit", "timm_resnet", "dinov2", "dinov2_cls")
_LOG = logging.getLogger(__name__)

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


def _check_layout(layout: str) -> None:
  if layout not in LAYOUTS:
    raise ConfigError(f"Unknown export layout {layout!r}; expected one of {LAYOUTS}.")


def torch_module(layout: str, path: str) -> tuple[str, str] | None:
  """(torch module path, kind) of a jtl module path, or None if unmapped."""
  _check_layout(layout)
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


def _convert_module(kind: str, name: str, leaves: dict[str, np.ndarray],
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
  _check_layout(layout)
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
                 for leaf in _convert_module(kind, name, leaves, out)]
  for leaf, name in top.items():
    if leaf in params:
      out[name] = params[leaf]
  if layout in _SAVED_NAMES:
    out = {f"{saved_name(layout, k.rpartition('.')[0])}.{k.rpartition('.')[2]}": v
           for k, v in out.items()}
  if problems:
    raise CheckpointError(f"Cannot write the {layout} layout:\n" + bullet_list(problems))
  return out


def _labels(num_classes: int) -> dict[str, Any]:
  """transformers' id2label / label2id (num_labels follows from them)."""
  return {"id2label": {str(i): f"LABEL_{i}" for i in range(num_classes)},
          "label2id": {f"LABEL_{i}": i for i in range(num_classes)}}


def _bert_config(module: Any) -> dict[str, Any]:
  c = module.config
  task = module.num_classes and module.pool == "cls_pooler"  # BertForSequenceClassification
  return {"architectures": ["BertForSequenceClassification" if task else "BertModel"],
          **(_labels(module.num_classes) if task else {}), "model_type": "bert",
          "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
          "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
          "intermediate_size": c.intermediate_size, "hidden_act": "gelu",
          "hidden_dropout_prob": c.dropout, "attention_probs_dropout_prob": c.attention_dropout,
          "max_position_embeddings": c.max_position, "type_vocab_size": c.type_vocab_size,
          "layer_norm_eps": c.layer_norm_eps, "initializer_range": 0.02, "pad_token_id": 0,
          "position_embedding_type": "absolute", "torch_dtype": "float32"}


def _run_inputs(inputs: Normalization, num_classes: int) -> dict[str, Any]:
  """timm's pretrained_cfg for images made as `inputs` says: resized to its
  image_size with its resize method, the whole image (crop_fraction None:
  crop_mode "squash", as jtl's input pipeline) or its central crop, then its
  affine (as mean and std on 0..1 pixels)."""
  mean, std = unit_mean_std(inputs)
  side, crop = int(inputs.image_size), inputs.crop_fraction
  return {"input_size": [3, side, side], "mean": mean,
          "std": std, "crop_pct": 1.0 if crop is None else float(crop),
          "crop_mode": "squash" if crop is None else "center",
          "interpolation": inputs.resize, "num_classes": num_classes}


def _vit_config(module: Any, inputs: Normalization | None = None) -> dict[str, Any]:
  names = {192: "vit_tiny", 384: "vit_small"}
  arch = f"{names.get(module.width, 'vit_base')}_patch16_224"
  size = module.image_size if inputs is None else int(inputs.image_size)
  args = {"embed_dim": module.width, "depth": module.depth, "num_heads": module.num_heads,
          "mlp_ratio": module.mlp_dim / module.width, "patch_size": module.patch_size,
          "img_size": size}
  if not module.exact_gelu:  # jtl's default tanh GELU; timm's nn.GELU is erf
    args["act_layer"] = "gelu_tanh"
  published = {"input_size": [3, size, size], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
               "crop_pct": 0.9, "num_classes": module.num_classes}
  return {"architecture": arch, "num_classes": module.num_classes,
          "num_features": module.width, "model_args": args,
          "pretrained_cfg": published if inputs is None else _run_inputs(
              inputs, module.num_classes)}


def _resnet_config(module: Any, inputs: Normalization | None = None) -> dict[str, Any]:
  stages = [int(s) for s in module.stage_sizes]
  standard = {(2, 2, 2, 2, False): "resnet18", (3, 4, 6, 3, False): "resnet34",
              (3, 4, 6, 3, True): "resnet50"}
  key = (*stages, bool(module.bottleneck))
  arch = standard.get(key, "resnet50" if module.bottleneck else "resnet18")
  args = {} if key in standard else {"layers": stages}
  published = {"input_size": [3, 224, 224], "mean": [float(v) for v in resnet.IMAGENET_MEAN],
               "std": [float(v) for v in resnet.IMAGENET_STD], "crop_pct": 0.875,
               "num_classes": module.num_classes}
  return {"architecture": arch, "num_classes": module.num_classes, "model_args": args,
          "pretrained_cfg": published if inputs is None else _run_inputs(
              inputs, module.num_classes)}


def _dinov2_config(module: Any) -> dict[str, Any]:
  """transformers' Dinov2Config as `save_pretrained` writes it (the fields its
  Dinov2Model / Dinov2ForImageClassification read; `dinov2.hub_spec` reads it
  back)."""
  if module.interpolate_offset:
    _LOG.warning("Dinov2 interpolate_offset=%s (the original DINOv2 resize) has no "
                 "transformers config field: transformers >= 4.44 resizes position "
                 "embeddings to the grid size; outputs at other resolutions differ slightly.",
                 module.interpolate_offset)
  mlp = int(module.width * module.mlp_ratio)
  if mlp % module.width:  # transformers' Dinov2Config: mlp_ratio: int
    raise ConfigError(f"Dinov2 width {module.width} x mlp_ratio {module.mlp_ratio} = MLP "
                      f"{mlp}: transformers' Dinov2Config holds an integer mlp_ratio; export "
                      "a Dinov2 whose MLP width is a multiple of its width.")
  config = {
      "architectures": ["Dinov2ForImageClassification" if module.num_classes else "Dinov2Model"],
      "model_type": "dinov2", "hidden_size": module.width,
      "num_hidden_layers": module.depth, "num_attention_heads": module.num_heads,
      "mlp_ratio": mlp // module.width, "patch_size": module.patch_size,
      "image_size": module.image_size, "num_channels": 3, "hidden_act": "gelu",
      "layer_norm_eps": float(module.layer_norm_eps),
      "layerscale_value": float(module.layerscale_value),
      "hidden_dropout_prob": float(module.dropout), "attention_probs_dropout_prob": 0.0,
      "drop_path_rate": 0.0, "initializer_range": 0.02, "qkv_bias": True,
      "use_swiglu_ffn": False, "use_mask_token": True, "apply_layernorm": True,
      "reshape_hidden_states": True, "dtype": "float32"}
  if module.num_classes:
    config.update(_labels(module.num_classes))
  return config


def hub_config(module: Any, inputs: Normalization | None = None) -> dict[str, Any]:
  """The config.json of the export: transformers' for BERT and DINOv2, timm's
  Hub form else (with `inputs`: the preprocessing of a fine-tuning run, see
  `export_hf`)."""
  layout = layout_of(module)
  base = getattr(module, "base", module)
  if layout in ("timm_vit", "timm_resnet"):
    return (_vit_config if layout == "timm_vit" else _resnet_config)(base, inputs)
  return {"bert": _bert_config, "bert_cls": _bert_config, "dinov2": _dinov2_config,
          "dinov2_cls": _dinov2_config}[layout](base)


def _vit_at(module: Any, variables: dict[str, Any], size: int) -> dict[str, Any]:
  """ViT variables for `size` px inputs: the position embedding resized to
  that patch grid as the module's forward pass resizes it on the fly (what a
  run at another size than the module's computed), so that timm's strict
  img_size model holds the same numbers."""
  module = getattr(module, "base", module)
  grid, own = size // module.patch_size, module.image_size // module.patch_size
  if grid == own:
    return variables
  params = dict(variables["params"])
  params["pos_embedding"] = resize_pos_embed(np.asarray(params["pos_embedding"]), grid)
  return {**variables, "params": params}


def write_safetensors(tensors: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
  """Writes tensors with the {"format": "pt"} metadata transformers and PEFT expect.

  Same tensors give the same bytes (keys are sorted by the format).
  """
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  paths.write_atomic(path, safetensors.numpy.save(
      {k: np.array(v, order="C") for k, v in tensors.items()}, metadata={"format": "pt"}))


def _write_json(obj: Any, path: epath.Path) -> None:
  paths.write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def export_hf(module: Any, variables: PyTree, out_dir: str | os.PathLike, *,
              alpha: float | None = None, tokenizer: Any = None,
              max_length: int | None = None, inputs: Normalization | None = None,
              record: Mapping[str, Any] | None = None) -> epath.Path:
  """Writes merged fine-tuned weights in the HF (BERT, DINOv2) / timm (ViT, ResNet) layout.

  Args:
    module: the jtl module (or a `LoraModel`, whose alpha is used).
    variables: its variables; LoRA leaves are merged with `alpha`.
    out_dir: folder for `model.safetensors` and `config.json` (and, for a BERT
      with a head on the mean-pooled features, `head.safetensors`).
    alpha: LoRA alpha, needed when the params hold adapters.
    tokenizer: a text model's tokenizer.json (`spec.tokenizer_file()`), copied
      beside the weights so that the folder loads with its preprocessing
      (`models.create(out_dir)`), with the tokenizer files found beside it
      (`TOKENIZER_FILES`: tokenizer_config.json's lower-casing and maximum
      length, which `AutoTokenizer` reads); None: none.
    max_length: the tokens per text the run trained with, written into the
      copied tokenizer.json's truncation and padding; None keeps the file's.
    inputs: for an image layout, the images the weights were fine-tuned and
      evaluated on: resized to `inputs.image_size` with its `resize` method,
      the whole image (crop_fraction None, as jtl's input pipeline) or its
      central crop, normalised by its affine. timm (ViT, ResNet): written as
      pretrained_cfg's input_size [3, s, s], crop_pct, crop_mode ("squash":
      no crop), interpolation, mean and std, and as a ViT's img_size s (its
      position embedding resized to that grid, as the run's forward pass
      did). DINOv2: written as transformers' BitImageProcessor
      preprocessor_config.json (size {"height": s, "width": s}, no center
      crop, resample); config.json keeps the module's image_size, the grid
      of the position embedding that jtl and transformers interpolate to the
      input's. None: the module's own size and the family's published
      preprocessing (DINOv2: `dinov2.published_normalization`).
    record: entries added to config.json as they are (what was done to the
      weights, e.g. {"adabn": {...}}: BatchNorm statistics re-estimated).

  Returns:
    out_dir as an `epath.Path` (a local folder or a bucket URL, `jtl.paths`).

  Example (from PyTorch):
    transformers.AutoModel.from_pretrained(out_dir)            # BERT, DINOv2
    transformers.BertForSequenceClassification.from_pretrained(out_dir)  # pool="cls_pooler"
    transformers.Dinov2ForImageClassification.from_pretrained(out_dir)  # DINOv2 + head
    m = timm.create_model(cfg["architecture"], num_classes=cfg["num_classes"],
                          **cfg["model_args"])  # ViT / ResNet (act_layer included)
    m.load_state_dict(safetensors.torch.load_file(out_dir + "/model.safetensors"))
  """
  layout = layout_of(module)
  alpha = getattr(module, "alpha", None) if alpha is None else alpha
  variables = dict(variables)
  params = variables["params"]
  if lora_layout.adapter_params(params):
    if alpha is None:
      raise ConfigError("The params hold LoRA adapters: pass alpha= (or the LoraModel) "
                        "to merge them before export.")
    variables["params"] = lora_layout.merge_lora(params, alpha)
  if inputs is not None and layout == "timm_vit":
    variables = _vit_at(module, variables, int(inputs.image_size))
  sd = to_torch_state_dict(variables, layout)
  out = paths.path(out_dir)
  if layout == "bert":
    head = {k: sd.pop(k) for k in list(sd) if k.startswith("classifier.")}
    if head:
      write_safetensors(head, out / "head.safetensors")
  write_safetensors(sd, out / "model.safetensors")
  _write_json({**hub_config(module, inputs), **(record or {})}, out / "config.json")
  if layout in ("dinov2", "dinov2_cls"):  # the inputs, for AutoImageProcessor and jtl
    published = dinov2.published_normalization(getattr(module, "base", module).image_size)
    _write_json(image_processor_config(inputs or published), out / IMAGE_PROCESSOR_FILE)
  if tokenizer is not None:
    tokenizer = paths.path(tokenizer)
    paths.write_atomic(out / "tokenizer.json",
                       _with_length(tokenizer.read_bytes(), max_length))
    for name in TOKENIZER_FILES:
      if (tokenizer.parent / name).exists():
        paths.write_atomic(out / name, (tokenizer.parent / name).read_bytes())
  return out


def _with_length(tokenizer_json: bytes, max_length: int | None) -> bytes:
  """A tokenizer.json truncating and padding to `max_length` tokens (None: as is)."""
  if max_length is None:
    return tokenizer_json
  tok = json.loads(tokenizer_json)
  truncation = tok.get("truncation") or {"direction": "Right", "strategy": "LongestFirst",
                                         "stride": 0}
  padding = tok.get("padding") or {"direction": "Right", "pad_to_multiple_of": None,
                                   "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"}
  tok["truncation"] = {**truncation, "max_length": max_length}
  tok["padding"] = {**padding, "strategy": {"Fixed": max_length}}
  return (json.dumps(tok, ensure_ascii=False) + "\n").encode()


# What transformers' tokenizers read beside tokenizer.json.
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
