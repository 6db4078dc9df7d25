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

The module paths and tensors of each layout are `jtl.export.hf_layout`'s.

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
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from jtl import paths
from jtl import lora_layout
from jtl.errors import ConfigError
from jtl.export.hf_layout import layout_of, to_torch_state_dict
from jtl.models import dinov2, resnet
from jtl.models.preprocessing import (IMAGE_PROCESSOR_FILE, Normalization,
                                     image_processor_config, unit_mean_std)
from jtl.tree import PyTree
from jtl.weights.adapt import resize_pos_embed

_LOG = logging.getLogger(__name__)


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
