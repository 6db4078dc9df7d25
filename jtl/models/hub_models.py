"""Zoo models for Hub repos: `create("hf-hub:<owner>/<name>")` reads config.json.

A timm repo's config.json names the `architecture` (and `model_args`) and its
`pretrained_cfg` (input size, mean/std, crop); a Hugging Face transformers
repo names its `model_type` and sizes. `spec_for` turns either into a
`ModelSpec` of the jtl module that implements it, with a converter from the
published state-dict layout (every key mapped, every shape checked by the
strict load), the preprocessing of `pretrained_cfg` and the repo as the
pretrained source. Architectures jtl does not implement are a ConfigError
listing `SUPPORTED`.

>>> parse_timm_vit("vit_base_patch16_384")
('b', 16, 384)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from jtl.errors import CheckpointError, ConfigError, bullet_list
from jtl.models import bert, dinov2, efficientnet, mobilenet, registry, resnet, text, vit
from jtl.models.conversion import convert_with_rules
from jtl.models.preprocessing import IMAGE_PROCESSOR_FILE, PRESETS, Normalization, preset_of
from jtl.weights import hub

SUPPORTED = (
    "timm resnet18, resnet50 (e.g. timm/resnet50.a1_in1k)",
    "timm vit_tiny_patch16_*, vit_small_patch16_*, vit_base_patch16_* "
    "(class token; e.g. timm/vit_base_patch16_224.augreg2_in21k_ft_in1k)",
    "timm mobilenetv2_100 (timm/mobilenetv2_100.ra_in1k)",
    "timm tf_efficientnet_lite0, tf_efficientnet_lite1, tf_efficientnet_lite2",
    "transformers model_type 'bert' (google-bert/bert-base-uncased, "
    "sentence-transformers/all-MiniLM-L6-v2; BertModel, BertForSequenceClassification)",
    ("transformers model_type 'dinov2' (facebook/dinov2-small, facebook/dinov2-base; "
     "Dinov2Model or Dinov2ForImageClassification)"),
)
# Pretraining heads of BERT checkpoints (BertForPreTraining): not part of the
# encoder; a strict load lists them as skipped.
SKIP = (r"cls\.(predictions|seq_relationship)\..*",)
_VIT_SIZES = {"tiny": "ti", "small": "s", "base": "b"}
# timm act_layer names of a ViT's MLP -> jtl ViT exact_gelu (erf) or not (tanh).
_TIMM_GELU = {"gelu": True, "gelu_tanh": False}
_LITE_STAGES = {0: efficientnet.LITE0_STAGES}


# Bounds on config.json's sizes, beyond what any published model of these
# families has (ViT-g: 40 layers, width 1536; BERT vocabularies ~1e5; timm
# heads ~2e4 classes): a config.json asking for more is damaged, and is
# refused before anything that size is built or allocated.
MAX_LAYERS = 1000
_LIMITS = {"layers": MAX_LAYERS, "width": 65536, "heads": 1024, "image": 4096,
           "classes": 100_000, "vocab": 1_000_000, "positions": 65536, "types": 1024}
# Tensor names that carry a transformer layer's index, per published layout.
_TIMM_BLOCK = r"^blocks\.(\d{1,9})\."
_HF_LAYER = r"(?:^|\.)encoder\.layer\.(\d{1,9})\."


def _damaged(where: str, key: str, value: Any, expected: str) -> ConfigError:
  return ConfigError(f"{where}: {key}={value!r:.60}; expected {expected}. The config.json "
                     "is damaged or not for this model.")


def _int_field(value: Any, key: str, where: str, limit: str, low: int = 1) -> int:
  """config.json's integer `value` (under `key`), checked to be low.._LIMITS[limit]."""
  high = _LIMITS[limit]
  if (isinstance(value, bool) or not isinstance(value, (int, float))
      or not math.isfinite(value) or value != int(value) or not low <= value <= high):
    raise _damaged(where, key, value, f"an integer from {low} to {high}")
  return int(value)


def _layer_count(value: Any, key: str, where: str) -> int:
  """config.json's layer count `value` (under `key`), checked to be 1..MAX_LAYERS."""
  if (isinstance(value, bool) or not isinstance(value, (int, float))
      or not math.isfinite(value) or value != int(value) or not 1 <= value <= MAX_LAYERS):
    raise _damaged(where, key, value, f"a layer count from 1 to {MAX_LAYERS}")
  return int(value)


def _float_field(value: Any, key: str, where: str, low: float, high: float) -> float:
  """config.json's number `value`, checked to be finite and in [low, high]."""
  if (isinstance(value, bool) or not isinstance(value, (int, float))
      or not math.isfinite(value) or not low <= value <= high):
    raise _damaged(where, key, value, f"a number from {low} to {high}")
  return float(value)


def _object(value: Any, key: str, where: str) -> dict[str, Any]:
  if value is None:
    return {}
  if not isinstance(value, dict):
    raise _damaged(where, key, value, "a JSON object")
  return value


def _depth_check(pattern: str, depth: int, key: str, source: str) -> Any:
  """A `ModelSpec.check_names`: the weights must hold layers 0..depth-1 (names
  matching `pattern`, whose group is the index), as config.json's `key` says."""

  def check(names: Any, where: str) -> None:
    found = sorted({int(m.group(1)) for n in names if (m := re.search(pattern, n))})
    if found != list(range(depth)):
      held = (f"layers {found[0]}..{found[-1]} ({len(found)} distinct)" if found
              else "no layer tensors")
      raise CheckpointError(
          f"{source}: config.json says {key}={depth}, but the weights {where} hold "
          f"{held}. The config and the weights do not describe the same model; use "
          "a revision whose config.json matches its weights.")
  return check


def _unsupported(what: str, where: str) -> ConfigError:
  return ConfigError(
      f"{where}: {what} is not implemented in jtl's zoo. Supported:\n"
      + bullet_list(SUPPORTED) + "\nOther weights can still be read with "
      "jtl.weights.read('hf://<owner>/<name>/<file>') and loaded with your own "
      "module and converter (jtl.weights.load_pretrained).")


def parse_timm_vit(arch: str) -> tuple[str, int, int] | None:
  """("ti"|"s"|"b", patch, image size) of a timm ViT name, else None."""
  m = re.fullmatch(r"vit_(tiny|small|base)_patch(\d+)_(\d+)", arch)
  return (_VIT_SIZES[m.group(1)], int(m.group(2)), int(m.group(3))) if m else None


# --- converters from the published layouts -----------------------------------

def convert_timm_vit(sd: Mapping[str, np.ndarray], *, num_heads: int) -> dict[str, np.ndarray]:
  """timm VisionTransformer state dict -> jtl ViT paths (fused qkv split).

  Unknown keys pass through unchanged so that a strict load reports them.

  >>> sd = {"blocks.0.attn.qkv.weight": np.zeros((12, 4)), "cls_token": np.zeros((1, 1, 4))}
  >>> {k: v.shape for k, v in convert_timm_vit(sd, num_heads=2).items()}  # doctest: +NORMALIZE_WHITESPACE
  {'params/Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel': (4, 2, 2),
   'params/Transformer/encoderblock_0/MultiHeadDotProductAttention_0/key/kernel': (4, 2, 2),
   'params/Transformer/encoderblock_0/MultiHeadDotProductAttention_0/value/kernel': (4, 2, 2),
   'params/cls': (1, 1, 4)}
  """
  out: dict[str, np.ndarray] = {}
  simple = {"cls_token": "cls", "pos_embed": "pos_embedding",
            "norm.weight": "Transformer/encoder_norm/scale",
            "norm.bias": "Transformer/encoder_norm/bias", "head.bias": "head/bias"}
  for key, value in sd.items():
    value = np.asarray(value)
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if key in simple:
      out[f"params/{simple[key]}"] = value
    elif key == "head.weight" and value.ndim == 2:
      out["params/head/kernel"] = value.T
    elif key == "patch_embed.proj.weight" and value.ndim == 4:
      out["params/embedding/kernel"] = np.transpose(value, (2, 3, 1, 0))
    elif key == "patch_embed.proj.bias":
      out["params/embedding/bias"] = value
    elif m is not None and _vit_block(out, f"Transformer/encoderblock_{m.group(1)}",
                                      m.group(2), value, num_heads):
      pass
    else:
      out[key] = value
  return out


def _vit_block(out: dict[str, np.ndarray], block: str, rest: str, value: np.ndarray,
               num_heads: int) -> bool:
  """Adds one timm block tensor to `out`; False when `rest` is unknown."""
  mha = f"params/{block}/MultiHeadDotProductAttention_0"
  norms = {"norm1": "LayerNorm_0", "norm2": "LayerNorm_1"}
  mlps = {"mlp.fc1": "MlpBlock_0/Dense_0", "mlp.fc2": "MlpBlock_0/Dense_1"}
  module, _, leaf = rest.rpartition(".")
  if module in norms and leaf in ("weight", "bias"):
    out[f"params/{block}/{norms[module]}/{'scale' if leaf == 'weight' else 'bias'}"] = value
  elif module in mlps and leaf == "weight" and value.ndim == 2:
    out[f"params/{block}/{mlps[module]}/kernel"] = value.T
  elif module in mlps and leaf == "bias":
    out[f"params/{block}/{mlps[module]}/bias"] = value
  elif module == "attn.qkv" and value.shape[0] % (3 * num_heads) == 0 and value.ndim in (1, 2):
    width = value.shape[0] // 3
    for i, name in enumerate(("query", "key", "value")):
      part = value[i * width:(i + 1) * width]
      if leaf == "weight" and value.ndim == 2:
        out[f"{mha}/{name}/kernel"] = part.T.reshape(part.shape[1], num_heads, -1)
      elif leaf == "bias" and value.ndim == 1:
        out[f"{mha}/{name}/bias"] = part.reshape(num_heads, -1)
      else:
        return False
  elif module == "attn.proj" and leaf == "weight" and value.ndim == 2:
    out[f"{mha}/out/kernel"] = value.T.reshape(num_heads, -1, value.shape[0])
  elif module == "attn.proj" and leaf == "bias":
    out[f"{mha}/out/bias"] = value
  else:
    return False
  return True


def _effnet_block(stage_starts: tuple[int, ...], m: re.Match) -> str:
  """timm EfficientNet/MobileNet block module -> jtl InvertedResidual path."""
  stage, index, module = int(m.group(1)), int(m.group(2)), m.group(3)
  if stage >= len(stage_starts):
    return f"unknown_stage_{stage}/{index}/{module}"
  names = ({"conv_dw": "dw", "bn1": "dw_bn", "conv_pw": "project_conv", "bn2": "project_bn"}
           if stage == 0 else  # DepthwiseSeparableConv (expand 1)
           {"conv_pw": "expand_conv", "bn1": "expand_bn", "conv_dw": "dw", "bn2": "dw_bn",
            "conv_pwl": "project_conv", "bn3": "project_bn"})
  return f"blocks_{stage_starts[stage] + index}/{names.get(module, 'unknown_' + module)}"


def convert_timm_effnet(sd: Mapping[str, np.ndarray], *,
                        stage_repeats: tuple[int, ...]) -> dict[str, np.ndarray]:
  """timm EfficientNet-family state dict (mobilenetv2_100, tf_efficientnet_lite*)
  -> the flat paths of jtl's MobileNetV2 / EfficientNetLite.

  >>> sd = {"blocks.1.1.conv_dw.weight": np.zeros((144, 1, 3, 3)),
  ...       "classifier.weight": np.zeros((1000, 1280))}
  >>> {k: v.shape for k, v in convert_timm_effnet(sd, stage_repeats=(1, 2)).items()}
  {'params/blocks_2/dw/kernel': (3, 3, 1, 144), 'params/head/kernel': (1280, 1000)}
  """
  starts = tuple(int(s) for s in np.cumsum((0,) + tuple(stage_repeats))[:-1])
  rules = ((r"conv_stem", "stem/conv"), (r"bn1", "stem/bn"), (r"conv_head", "top/conv"),
           (r"bn2", "top/bn"), (r"classifier", "head"),
           (r"blocks\.(\d+)\.(\d+)\.(\w+)", functools.partial(_effnet_block, starts)))
  return convert_with_rules(sd, rules)


def convert_hf_bert(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Hugging Face BERT (BertModel, BertForPreTraining, sentence-transformers)
  -> jtl Bert paths; the pretraining heads (`cls.*`) pass through for `SKIP`."""
  return bert.convert_torch(sd)


# --- config.json -> ModelSpec ------------------------------------------------

def _image_normalization(cfg: Mapping[str, Any], size: int, default_crop: float,
                         default_preset: str | None = None) -> Normalization:
  """The `Normalization` of a timm pretrained_cfg (mean/std default to ImageNet's);
  its preset is the pipeline's with that mean/std, else `default_preset`."""
  imagenet = PRESETS["imagenet"]
  try:
    mean = np.asarray(cfg.get("mean", imagenet.mean), np.float32)
    std = np.asarray(cfg.get("std", imagenet.std), np.float32)
    crop = float(cfg.get("crop_pct", default_crop))
  except (TypeError, ValueError, OverflowError):
    mean = std = np.zeros(0)
    crop = 0.0
  if (mean.shape != (3,) or std.shape != (3,) or not np.all(std > 0)
      or not np.all(np.isfinite(mean)) or not np.all(np.isfinite(std)) or not 0 < crop <= 1):
    raise ConfigError(f"pretrained_cfg: mean {mean}, std {std} or crop_pct {crop} "
                      "is not 3 values / 3 positive values / in (0, 1].")
  preset = preset_of(mean, std) or default_preset
  interpolation = cfg.get("interpolation", "bicubic")  # timm's default
  if interpolation not in ("bilinear", "bicubic"):
    raise ConfigError(f"pretrained_cfg interpolation {str(interpolation)[:40]!r}: jtl resizes "
                      "'bilinear' or 'bicubic'.")
  # timm's "squash" at crop_pct 1: the whole image resized, no crop (a jtl run's export).
  mode = cfg.get("crop_mode", "center")
  squash = mode == "squash"
  if mode not in ("center", "squash") or (squash and crop < 1):
    raise ConfigError(f"pretrained_cfg crop_mode {str(mode)[:40]!r} with crop_pct {crop}: jtl "
                      "preprocesses 'center' crops, or 'squash' at crop_pct 1 (the whole image "
                      "resized); timm's squash then crop and 'border' are not implemented.")
  return Normalization(preset, mean=mean, std=std, image_size=size,
                       crop_fraction=None if squash else crop, resize=interpolation)


def _timm_spec(source: str, config: Mapping[str, Any]) -> registry.ModelSpec:
  arch = str(config.get("architecture"))[:200]
  where = f"{source} (config.json architecture {arch!r})"
  cfg = _object(config.get("pretrained_cfg"), "pretrained_cfg", where)
  args = dict(_object(config.get("model_args"), "model_args", where))
  num_classes = _int_field(config.get("num_classes", cfg.get("num_classes", 1000)),
                           "num_classes", where, "classes", low=0)
  size = _input_size(cfg.get("input_size"), where)
  if (v := parse_timm_vit(arch)) is not None:
    return _timm_vit_spec(source, v, args, cfg, num_classes, where)
  if args:
    raise ConfigError(f"{where}: model_args {sorted(args)} are not supported for "
                      "this architecture; jtl builds it at its published size.")
  if arch in ("resnet18", "resnet50"):
    depth = int(arch[len("resnet"):])
    base, converter = registry.get_spec(arch), resnet.convert_torch
    build = lambda num_classes=num_classes: resnet.resnet(depth, num_classes)
  elif arch == "mobilenetv2_100":
    base = registry.get_spec("mobilenet_v2")
    build = lambda num_classes=num_classes, **kw: mobilenet.mobilenet_v2(num_classes, **kw)
    converter = functools.partial(convert_timm_effnet, stage_repeats=tuple(
        s[2] for s in mobilenet.V2_STAGES))
  elif (m := re.fullmatch(r"tf_efficientnet_lite([0-2])", arch)) is not None:
    stages = efficientnet.LITE_STAGES[int(m.group(1))]
    base = registry.get_spec(f"efficientnet_lite{m.group(1)}")
    build = lambda num_classes=num_classes, **kw: efficientnet.EfficientNetLite(
        num_classes=num_classes, stages=stages, **kw)
    converter = functools.partial(convert_timm_effnet,
                                  stage_repeats=tuple(s[0] for s in stages))
  else:
    raise _unsupported(f"the timm architecture {arch!r}", source)
  normalization = _image_normalization(cfg, size, 0.875, base.normalization.preset)
  return dataclasses.replace(
      base, name=source, build=build, pretrained=source, converter=converter,
      default_num_classes=num_classes, **registry.image_inputs(normalization))


def _input_size(value: Any, where: str, default: int = 224) -> int:
  """The image side of pretrained_cfg's input_size [channels, height, width]."""
  if value is None:
    return default
  if not (isinstance(value, list) and len(value) == 3 and value[1] == value[2]):
    raise _damaged(where, "pretrained_cfg input_size", value, "[3, size, size]")
  return _int_field(value[2], "pretrained_cfg input_size", where, "image")


def _timm_vit_spec(source: str, parsed: tuple[str, int, int], args: dict[str, Any],
                   cfg: Mapping[str, Any], num_classes: int, where: str) -> registry.ModelSpec:
  variant, patch, size = parsed
  width, depth, mlp_dim, heads = vit.VARIANTS[variant]
  if args.pop("class_token", True) is not True or args.pop("global_pool", "token") != "token":
    raise ConfigError(f"{where}: jtl's ViT pools the class token; this model "
                      "uses another pooling (class_token/global_pool).")
  args.pop("num_classes", None)
  ratio = _float_field(args.pop("mlp_ratio", mlp_dim / width), "model_args mlp_ratio", where,
                       1e-3, 64)
  width = _int_field(args.pop("embed_dim", width), "model_args embed_dim", where, "width")
  depth = _layer_count(args.pop("depth", depth), "model_args depth", where)
  heads = _int_field(args.pop("num_heads", heads), "model_args num_heads", where, "heads")
  mlp_dim = max(1, int(width * ratio))
  size = _int_field(args.pop("img_size", _input_size(cfg.get("input_size"), where, size)),
                    "model_args img_size", where, "image")
  patch = _int_field(args.pop("patch_size", patch), "model_args patch_size", where, "image")
  if width % heads or patch > size:
    raise ConfigError(f"{where}: embed_dim {width} must be a multiple of num_heads {heads}, "
                      f"patch_size {patch} at most img_size {size}.")
  act = args.pop("act_layer", "gelu")  # timm's default nn.GELU is erf
  if not isinstance(act, str) or act not in _TIMM_GELU:
    raise ConfigError(f"{where}: model_args act_layer {act!r}; jtl's ViT implements "
                      f"{sorted(_TIMM_GELU)}.")
  if args:
    raise ConfigError(f"{where}: model_args {sorted(args)} are not supported; jtl "
                      "takes embed_dim, depth, num_heads, mlp_ratio, patch_size, "
                      "img_size, act_layer, class_token=True, global_pool='token'.")
  kw = dict(patch_size=patch, width=width, depth=depth, mlp_dim=mlp_dim,
            num_heads=heads, image_size=size, exact_gelu=_TIMM_GELU[act])
  return registry.ModelSpec(
      name=source, build=lambda num_classes=num_classes, **extra: vit.ViT(
          num_classes=num_classes, **{**kw, **extra}),
      **registry.image_inputs(_image_normalization(cfg, size, 0.9)),
      groups=vit.groups(depth), groups_of=vit.built_groups, head_level=vit.HEAD_LEVEL,
      pretrained=source,
      converter=functools.partial(convert_timm_vit, num_heads=heads),
      default_num_classes=num_classes,
      check_names=_depth_check(_TIMM_BLOCK, depth, "model_args depth", source))


def _bert_task(config: Mapping[str, Any], where: str) -> tuple[int, str]:
  """(classes, pool) of a BERT config.json: a BertForSequenceClassification's
  classifier reads the [CLS] pooler output (jtl's pool="cls_pooler"); else
  no head and jtl's mean pooling."""
  arch = config.get("architectures")
  if not (isinstance(arch, list) and "BertForSequenceClassification" in arch):
    return 0, "mean"
  labels = config.get("id2label")
  if labels is not None and not (isinstance(labels, dict) and len(labels) <= _LIMITS["classes"]):
    raise _damaged(where, "id2label", labels, "an object {index: label}")
  return (len(labels or {}) or _int_field(config.get("num_labels", 2), "num_labels", where,
                                          "classes")), "cls_pooler"


def _bert_spec(source: str, config: Mapping[str, Any]) -> registry.ModelSpec:
  where = f"{source} (config.json model_type 'bert')"
  act = config.get("hidden_act", "gelu")
  pos = config.get("position_embedding_type", "absolute")
  if act != "gelu" or pos != "absolute":
    raise ConfigError(f"{where}: hidden_act {act!r} / position_embedding_type "
                      f"{pos!r}; jtl's Bert implements 'gelu' / 'absolute'.")
  missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                         "num_attention_heads", "intermediate_size") if k not in config]
  if missing:
    raise ConfigError(f"{where}: config.json lacks {missing}; expected vocab_size, "
                      "hidden_size, num_hidden_layers, num_attention_heads, intermediate_size.")
  g = config.get
  c = bert.BertConfig(
      vocab_size=_int_field(g("vocab_size"), "vocab_size", where, "vocab"),
      hidden_size=_int_field(g("hidden_size"), "hidden_size", where, "width"),
      num_layers=_layer_count(g("num_hidden_layers"), "num_hidden_layers", where),
      num_heads=_int_field(g("num_attention_heads"), "num_attention_heads", where, "heads"),
      intermediate_size=_int_field(g("intermediate_size"), "intermediate_size", where, "width"),
      max_position=_int_field(g("max_position_embeddings", 512), "max_position_embeddings",
                              where, "positions"),
      type_vocab_size=_int_field(g("type_vocab_size", 2), "type_vocab_size", where, "types"),
      layer_norm_eps=_float_field(g("layer_norm_eps", 1e-12), "layer_norm_eps", where, 0, 1),
      dropout=_float_field(g("hidden_dropout_prob", 0.1), "hidden_dropout_prob", where, 0, 0.99),
      attention_dropout=_float_field(g("attention_probs_dropout_prob", 0.1),
                                     "attention_probs_dropout_prob", where, 0, 0.99))
  if c.hidden_size % c.num_heads:
    raise ConfigError(f"{where}: hidden_size {c.hidden_size} must be a multiple of "
                      f"num_attention_heads {c.num_heads}.")
  classes, pool = _bert_task(config, where)
  base = registry.get_spec("minilm_l6")
  return dataclasses.replace(
      base, name=source, build=lambda num_classes=0, **kw: bert.Bert(
          num_classes=num_classes, config=c, **{"pool": pool, **kw}),
      pretrained=source, converter=convert_hf_bert, groups=bert.groups(c.num_layers),
      head_level=bert.HEAD_LEVEL,
      groups_of=bert.built_groups,
      preprocess=_hub_preprocess(source, c.max_position),
      tokenizer_file=_hub_tokenizer_file(source),
      default_num_classes=classes,
      check_names=_depth_check(_HF_LAYER, c.num_layers, "num_hidden_layers", source))


def _hub_tokenizer_file(source: str) -> Any:
  """`tokenizer_file()` of a Hub BERT: its repo's (or folder's) tokenizer.json,
  fetched when first asked for."""
  def tokenizer_file() -> Any:
    local = hub.local_repo(source)
    if local is not None:
      return local / "tokenizer.json"
    ref = hub.parse(source)
    return hub.download(ref.repo_id, "tokenizer.json", ref.revision)
  return tokenizer_file


def _hub_preprocess(source: str, max_position: int) -> Any:
  """The preprocessing of a Hub BERT: its tokenizer.json (a LoadError at the
  first call if the repo has none), truncating at `max_position` at the latest."""
  tokenizer_file = _hub_tokenizer_file(source)

  def preprocess(texts: Any, *, max_length: int | None = None) -> dict[str, np.ndarray]:
    tokenizer = text.load_tokenizer(tokenizer_file(), max_length=max_length,
                                    max_position=max_position)
    return text.trim_padding(text.tokenize(tokenizer, texts))
  return preprocess


def _check_dinov2(source: str, config: Mapping[str, Any]) -> int:
  """Bounds on a DINOv2 config.json's sizes (`dinov2.hub_spec` reads it);
  returns its layer count."""
  where = f"{source} (config.json model_type 'dinov2')"
  g = config.get
  for key, limit in (("hidden_size", "width"), ("num_attention_heads", "heads")):
    _int_field(g(key), key, where, limit)
  for key, default in (("image_size", 224), ("patch_size", 14)):
    value = g(key, default)
    for v in (value if isinstance(value, list) and value else [value]):
      _int_field(v, key, where, "image")
  for key, default, low, high in (("mlp_ratio", 4, 1e-3, 64), ("layer_norm_eps", 1e-6, 0, 1),
                                  ("layerscale_value", 1.0, 0, 1e6)):
    _float_field(g(key, default), key, where, low, high)
  arch = g("architectures")
  if arch is not None and not (isinstance(arch, list) and all(isinstance(a, str) for a in arch)):
    raise _damaged(where, "architectures", arch, "a list of class names")
  labels = g("id2label")
  if labels is not None and not (isinstance(labels, dict) and len(labels) <= _LIMITS["classes"]):
    raise _damaged(where, "id2label", labels, "an object {index: label}")
  _int_field(g("num_labels", 2), "num_labels", where, "classes", low=0)
  return _layer_count(g("num_hidden_layers"), "num_hidden_layers", where)


def spec_for(source: str) -> registry.ModelSpec:
  """The ModelSpec of the Hub repo "hf-hub:<owner>/<name>[@rev]" (config.json),
  or of a local folder in the Hub layout (its path, or "hf-hub:<path>").

  Raises:
    ConfigError: an architecture jtl does not implement (lists `SUPPORTED`).
    CheckpointError: config.json cannot be downloaded or parsed.
  """
  if hub.local_repo(source) is None:
    ref = hub.parse(source)
    if ref is None or ref.filename is not None:
      raise ConfigError(f"{source!r}: a Hub model is 'hf-hub:<owner>/<name>[@rev]', or a "
                        "local folder holding its config.json and weights.")
  config = hub.read_config(source)
  if "architecture" in config:
    return _timm_spec(source, config)
  model_type = config.get("model_type")
  if model_type == "bert":
    return _bert_spec(source, config)
  if model_type == "dinov2":
    depth = _check_dinov2(source, config)
    processor = hub.read_json(source, IMAGE_PROCESSOR_FILE, optional=True)
    return dataclasses.replace(dinov2.hub_spec(source, config, processor),
                               check_names=_depth_check(_HF_LAYER, depth,
                                                        "num_hidden_layers", source))
  raise _unsupported(f"the model (model_type {model_type!r:.100}, architectures "
                     f"{config.get('architectures')!r:.200})", source)
