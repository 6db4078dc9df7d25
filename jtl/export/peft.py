"""LoRA adapters written out in the Hugging Face PEFT format (no torch).

`export_peft` writes a folder, `peft_tensors` its tensors and LoRA config;
`jtl.export.peft_import` reads such folders back into jtl params, with the
file names and constants defined here.

A PEFT LoRA adapter is a folder with `adapter_config.json` (peft_type "LORA",
r, lora_alpha, target_modules, modules_to_save, task_type, ...) and
`adapter_model.safetensors` whose keys are the torch module paths of the base
model under "base_model.model.", with the adapter name stripped:

  base_model.model.encoder.layer.0.attention.self.query.lora_A.weight  [r, in]
  base_model.model.encoder.layer.0.attention.self.query.lora_B.weight  [out, r]
  base_model.model.layer1.0.conv1.lora_A.weight                  [r, in, kh, kw]
  base_model.model.layer1.0.conv1.lora_B.weight                  [out, r, 1, 1]
  base_model.model.head.weight, ...head.bias      (a module in modules_to_save)

jtl holds an adapter as "lora_a" [fan_in, r] / "lora_b" [r, out] next to the
layer's kernel with scale alpha / r (`jtl.recipes.strategies.lora`), so the export is
a transpose (and for convolutions the HWIO <-> OIHW reshuffle) under the module
names of `jtl.export.hf_export` ("bert": transformers BertModel, "bert_cls":
BertForSequenceClassification (a Bert with pool="cls_pooler" and a head),
"timm_vit", "timm_resnet", "dinov2": transformers Dinov2Model, "dinov2_cls":
Dinov2ForImageClassification). PEFT's scale lora_alpha / r is jtl's with
lora_alpha = alpha; layers of another rank are listed in `rank_pattern`.
`PeftModel.from_pretrained(base, folder)` loads the export (tested against
peft, transformers and timm through fixtures).

DINOv2's query/key/value are separate Linears in transformers; jtl's
[width, heads, head_dim] kernels export one LoRA each under the names of
transformers >= 5's modules (`attention.q_proj`, `k_proj`, `v_proj`,
`o_proj`), which PEFT saves and matches; `peft_import` also reads the names
of transformers 4 (`attention.attention.query`, `attention.output.dense`).

timm's ViT fuses query, key and value in one `attn.qkv` Linear; jtl's has
three [width, heads, head_dim] kernels. LoRAs on them (lora_a [width, r],
lora_b [r, heads * head_dim]) export exactly as one qkv LoRA of rank
r_q + r_k + r_v: lora_A = concat(A_q, A_k, A_v), lora_B = block diagonal
(B_q, B_k, B_v), with rank_pattern / alpha_pattern keeping the scale alpha / r.
An adapter split after the heads axis ([width * heads, r] x [r, head_dim], as
`add_lora` makes for a LinearGeneral) exports as rank heads * r, also exactly.

DoRA (`add_lora(..., dora=True)`): the magnitude "lora_magnitude" [out]
exports as PEFT's `<module>.lora_magnitude_vector` ([out] for a
Linear, [1, out, 1, 1] for a Conv2d; PEFT's norm is over the input axes of
the torch weight, jtl's over the adapter's fan_in: the same axes where the
export keeps jtl's rank) with `use_dora: true`; a fused qkv's magnitude is
the concatenation of query's, key's and value's (||W||_c, the identity
rescale, for a projection without an adapter). `peft_import` reads it back.

Example:
  export_peft(lora_model, variables, "adapter/", base_model_name_or_path="timm/...")
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from jtl import lora_layout, paths
from jtl import tree as jtree
from jtl.export import hf_export, hf_layout
from jtl.errors import CheckpointError, ConfigError, bullet_list
from jtl.tree import PyTree

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
HEAD_FILE = "head.safetensors"  # BERT: jtl's head on the mean-pooled features
PREFIX = "base_model.model."
_TASK_TYPES = {"bert": "FEATURE_EXTRACTION", "bert_cls": "SEQ_CLS", "timm_vit": None,
               "timm_resnet": None, "dinov2": None, "dinov2_cls": None}
_AUTO_MAPPING = {
    "timm_vit": {"base_model_class": "VisionTransformer",
                 "parent_library": "timm.models.vision_transformer"},
    "timm_resnet": {"base_model_class": "ResNet", "parent_library": "timm.models.resnet"},
    "dinov2": {"base_model_class": "Dinov2Model",
               "parent_library": "transformers.models.dinov2.modeling_dinov2"},
    "dinov2_cls": {"base_model_class": "Dinov2ForImageClassification",
                   "parent_library": "transformers.models.dinov2.modeling_dinov2"},
}
_ADAPTABLE = ("linear", "linear_heads", "conv", "qkv")


def _modules(flat: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  out: dict[str, dict[str, Any]] = {}
  for path, value in flat.items():
    module, _, leaf = path.rpartition("/")
    out.setdefault(module, {})[leaf] = value
  return out


def _module_names(candidates: Sequence[str]) -> set[str]:
  """The torch module names PEFT matches target_modules against, as far as
  the adaptable layers show them: those layers and every module holding one
  (torch names each prefix: "layer1.0", a BasicBlock, holds "layer1.0.conv1")."""
  names = set(candidates)
  for name in candidates:
    parts = name.split(".")
    names.update(".".join(parts[:i]) for i in range(1, len(parts)))
  return names


def _peft_matches(targets: Sequence[str], name: str) -> bool:
  """PEFT's rule for a list of target_modules (`check_target_module_exists`):
  the name itself, or a name ending with "." + the entry."""
  return any(name == t or name.endswith("." + t) for t in targets)


def _targets(adapted: Sequence[str], candidates: Sequence[str]) -> list[str] | str:
  """PEFT target_modules: short names ("query") when they pick exactly
  `adapted` among the modules (containers included: ResNet's "0" of
  "downsample.0" would also pick the block "layer1.0", which PEFT cannot
  adapt), else a regex of the full names that PEFT full-matches."""
  short = sorted({name.rsplit(".", 1)[-1] for name in adapted})
  picked = {n for n in _module_names(candidates) if _peft_matches(short, n)}
  if picked == set(adapted):
    return short
  return "(" + "|".join(re.escape(n) for n in sorted(adapted)) + ")"


def _pattern_key(name: str, candidates: Sequence[str]) -> str:
  """A rank_pattern key that matches only `name` (PEFT: (.*\\.)?(key)$)."""
  clash = any(c != name and c.endswith("." + name) for c in _module_names(candidates))
  return "^" + re.escape(name) if clash else name


def _linear_lora(kernel_shape: Sequence[int], n_in: int, a: np.ndarray, b: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray] | str:
  """A jtl adapter as a LoRA of the torch Linear whose weight is the kernel as
  an [prod(shape[n_in:]), prod(shape[:n_in])] matrix: (lora_A [R, in], lora_B
  [out, R]), lora_B @ lora_A = (a @ b) as that matrix; a problem string else.

  jtl's a [prod(shape[:k]), r] / b [r, prod(shape[k:])] may split the kernel
  after its input axes (k > n_in; `add_lora` on a [width, heads, head_dim]
  kernel gives [width * heads, r] x [r, head_dim]): the axes in between join
  the rank, R = r * prod(shape[n_in:k]) with lora_B block diagonal. Exact.
  """
  shape = tuple(int(d) for d in kernel_shape)
  r = a.shape[1]
  splits = [k for k in range(n_in, len(shape) + 1)
            if math.prod(shape[:k]) == a.shape[0] and math.prod(shape[k:]) == b.shape[1]]
  if a.ndim != 2 or b.ndim != 2 or b.shape[0] != r or not splits:
    return (f"adapter lora_a {a.shape} x lora_b {b.shape} does not split kernel {shape} "
            f"after its {n_in} input ax{'i' if n_in == 1 else 'e'}s")
  mid = math.prod(shape[n_in:splits[0]])
  lora_a = a.reshape(math.prod(shape[:n_in]), mid * r).T
  lora_b = b.T if mid == 1 else np.kron(np.eye(mid, dtype=b.dtype), b.T)
  return np.ascontiguousarray(lora_a), np.ascontiguousarray(lora_b)


def _export_adapter(kind: str, kernel: np.ndarray, a: np.ndarray, b: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray] | str:
  """jtl (lora_a [fan_in, r], lora_b [r, out]) -> PEFT (lora_A, lora_B) weights."""
  r = a.shape[1]
  if kind in ("linear", "linear_heads"):
    return _linear_lora(kernel.shape, 1 if kind == "linear_heads" else kernel.ndim - 1, a, b)
  kh, kw, cin, _ = kernel.shape  # conv: A is a conv into r channels, B a 1x1 conv
  lora_a = np.transpose(a.reshape(kh, kw, cin, r), (3, 2, 0, 1))
  return np.ascontiguousarray(lora_a), np.ascontiguousarray(b.T[:, :, None, None])


_QKV = ("query", "key", "value")
_MAGNITUDE = "lora_magnitude_vector"  # as peft 0.21 saves it (older: + ".weight")


def _dora_magnitude(kind: str, leaves: Mapping[str, np.ndarray], exported_rank: int
                    ) -> np.ndarray | str:
  """PEFT's lora_magnitude_vector of one jtl DoRA layer; a problem string when
  the torch layer's norm axes are not the adapter's (its rank grew on export)."""
  if exported_rank != leaves["lora_a"].shape[1]:
    return (f"DoRA adapter lora_a {leaves['lora_a'].shape} splits the kernel "
            f"{leaves['kernel'].shape} after more than the torch layer's input axes, so its "
            "magnitude is not per torch output; add DoRA with the kernel's input axes as fan_in")
  m = np.asarray(leaves["lora_magnitude"], np.float32)
  return m.reshape(1, -1, 1, 1) if kind == "conv" else m


def _fused_magnitude(block: str, modules: Mapping[str, Mapping[str, np.ndarray]]
                     ) -> np.ndarray | str:
  """timm's fused qkv magnitude: query's, key's and value's (||W||_c without one)."""
  parts = []
  for name in _QKV:
    leaves = modules[f"{block}/{name}"]
    kernel = np.asarray(leaves["kernel"], np.float32)
    if "lora_a" in leaves and leaves["lora_a"].shape[0] != kernel.shape[0]:
      return f"{block}/{name}: a DoRA adapter on qkv needs lora_a [width, r]"
    parts.append(leaves["lora_magnitude"] if "lora_magnitude" in leaves
                 else np.asarray(lora_layout.column_norms(kernel, kernel.shape[0])))
  return np.concatenate(parts).astype(np.float32)


def _fused_qkv_lora(block: str, modules: Mapping[str, Mapping[str, np.ndarray]]
                    ) -> tuple[np.ndarray, np.ndarray, int, float] | str:
  """The LoRAs on one attention's query/key/value as one LoRA of timm's fused
  qkv Linear: lora_A = concat(A_q, A_k, A_v) [R, width], lora_B = block
  diagonal(B_q, B_k, B_v) [3 * width, R] (zero rows for a projection without
  an adapter). Returns (lora_A, lora_B, R, alpha factor): with rank_pattern
  R and alpha_pattern alpha * factor, PEFT's scale is jtl's alpha / r of the
  first adapted projection; the B blocks of projections of another rank r_p
  are multiplied by r / r_p, so every update is jtl's."""
  a_parts, b_parts, ranks = [], [], []
  for name in _QKV:
    leaves = modules.get(f"{block}/{name}", {})
    if "kernel" not in leaves:
      return f"{block}/{name}: no kernel (timm's qkv fuses query, key and value)"
    kernel = leaves["kernel"]
    out = math.prod(kernel.shape[1:])
    if "lora_a" not in leaves:
      b_parts.append((out, None))
      continue
    if "lora_b" not in leaves:
      return f"{block}/{name}: has lora_a but no lora_b"
    pair = _linear_lora(kernel.shape, 1, leaves["lora_a"], leaves["lora_b"])
    if isinstance(pair, str):
      return f"{block}/{name}: {pair}"
    a_parts.append(pair[0])
    b_parts.append((out, pair[1]))
    ranks.append(int(leaves["lora_a"].shape[1]))
  r0 = ranks[0]
  lora_a = np.concatenate(a_parts)
  total = lora_a.shape[0]
  lora_b = np.zeros((sum(o for o, _ in b_parts), total), lora_a.dtype)
  row = col = 0
  rank = iter(ranks)
  for out, part in b_parts:
    if part is not None:
      r_p = next(rank)
      lora_b[row:row + out, col:col + part.shape[1]] = part if r_p == r0 else part * (r0 / r_p)
      col += part.shape[1]
    row += out
  return lora_a, lora_b, total, total / r0


def peft_tensors(params: PyTree, layout: str, *, modules_to_save: Sequence[str] = ()
                 ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """PEFT safetensors tensors and the LoRA part of adapter_config.json.

  The config part has "alpha_factors": {rank_pattern key: f}, modules whose
  PEFT alpha must be alpha * f (alpha_pattern) to keep jtl's scale: timm's
  fused qkv (see `_fused_qkv_lora`) and adapters whose rank grew.

  Args:
    params: jtl params holding "lora_a"/"lora_b" leaves.
    layout: one of `hf_layout.LAYOUTS`.
    modules_to_save: jtl module paths saved whole (e.g. a new head, "head").

  Raises:
    CheckpointError: adapters the format cannot hold (all listed), or none.
  """
  modules = _modules({p: np.asarray(v) for p, v in jtree.flatten(params).items()})
  tensors, ranks, alpha_factors, candidates, problems = _adapters(modules, layout)
  if not ranks and not problems:
    raise CheckpointError("The params hold no LoRA adapters (lora_a/lora_b leaves) to export.")
  whole, saved, more = _saved_whole(layout, modules_to_save, modules)
  tensors.update(whole)
  problems += more
  dora = {n for n in ranks if f"{PREFIX}{n}.{_MAGNITUDE}" in tensors}
  if dora and dora != set(ranks):
    problems.append(f"DoRA on {sorted(dora)[:3]}... but plain LoRA on "
                    f"{sorted(set(ranks) - dora)[:3]}...: PEFT's use_dora covers every adapter")
  if problems:
    raise CheckpointError(f"Cannot write a PEFT {layout} adapter:\n" + bullet_list(problems))
  return tensors, _lora_config(ranks, alpha_factors, candidates, saved, dora)


# An adapter's PEFT tensors (names after the module's), its PEFT rank, its alpha
# factor (None: 1) and a problem found after the rank was known; or a problem alone.
_Adapter = tuple[dict[str, np.ndarray], int, float | None, str | None]


def _adapters(modules: Mapping[str, Mapping[str, np.ndarray]], layout: str
              ) -> tuple[dict[str, np.ndarray], dict[str, int], dict[str, float], list[str],
                         list[str]]:
  """(tensors, rank and alpha factor per torch module, the torch modules an
  adapter could target, problems) of every LoRA in `modules`."""
  tensors: dict[str, np.ndarray] = {}
  ranks: dict[str, int] = {}
  alpha_factors: dict[str, float] = {}
  candidates, problems = [], []
  for path, leaves in sorted(modules.items()):
    mapped = hf_layout.torch_module(layout, path) if "kernel" in leaves else None
    if mapped is not None and mapped[1] in _ADAPTABLE:
      candidates.append(mapped[0])
    if "lora_a" not in leaves:
      continue
    if mapped is None or mapped[1] not in _ADAPTABLE or (
        layout == "bert" and path == "head"):
      problems.append(f"{path}: no module of the base model holds it")
      continue
    name, kind = mapped
    if kind == "qkv" and name in ranks:  # one fused adapter per attention block, made once
      continue
    made = (_fused_adapter(path.rpartition("/")[0], modules) if kind == "qkv"
            else _one_adapter(path, kind, leaves))
    if isinstance(made, str):
      problems.append(made)
      continue
    adapter, ranks[name], factor, problem = made
    if factor is not None:
      alpha_factors[name] = factor
    if problem is not None:
      problems.append(problem)
    tensors.update({f"{PREFIX}{name}.{k}": v for k, v in adapter.items()})
  return tensors, ranks, alpha_factors, candidates, problems


def _fused_adapter(block: str, modules: Mapping[str, Mapping[str, np.ndarray]]
                   ) -> _Adapter | str:
  """The one adapter on timm's fused qkv of an attention `block` (`_fused_qkv_lora`)."""
  fused = _fused_qkv_lora(block, modules)
  if isinstance(fused, str):
    return fused
  lora_a, lora_b, rank, factor = fused
  out = {}
  if any("lora_magnitude" in modules.get(f"{block}/{q}", {}) for q in _QKV):
    magnitude = _fused_magnitude(block, modules)
    if isinstance(magnitude, str):
      return {}, rank, factor, magnitude
    out[_MAGNITUDE] = magnitude
  return {**out, "lora_A.weight": lora_a, "lora_B.weight": lora_b}, rank, factor, None


def _one_adapter(path: str, kind: str, leaves: Mapping[str, np.ndarray]) -> _Adapter | str:
  """The adapter of the module at `path` (a torch Linear or Conv of `kind`)."""
  if "lora_b" not in leaves:
    return f"{path}: has lora_a but no lora_b"
  pair = _export_adapter(kind, leaves["kernel"], leaves["lora_a"], leaves["lora_b"])
  if isinstance(pair, str):
    return f"{path}: {pair}"
  lora_a, lora_b = pair
  rank = int(lora_a.shape[0])
  # The rank grew (e.g. a conv's adapter over kernel positions): keep jtl's scale.
  factor = rank / leaves["lora_a"].shape[1] if rank != leaves["lora_a"].shape[1] else None
  out = {}
  if "lora_magnitude" in leaves:
    magnitude = _dora_magnitude(kind, leaves, rank)
    if isinstance(magnitude, str):
      return {}, rank, factor, f"{path}: {magnitude}"
    out[_MAGNITUDE] = magnitude
  return {**out, "lora_A.weight": lora_a, "lora_B.weight": lora_b}, rank, factor, None


def _saved_whole(layout: str, paths: Sequence[str],
                 modules: Mapping[str, Mapping[str, np.ndarray]]
                 ) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
  """(tensors, torch module names, problems) of the modules saved whole."""
  tensors: dict[str, np.ndarray] = {}
  saved, problems = [], []
  for path in paths:
    mapped = hf_layout.torch_module(layout, path)
    leaves = modules.get(path)
    if mapped is None or not leaves or "lora_a" in leaves:
      problems.append(f"{path}: modules_to_save needs a plain mapped module "
                      f"(found {sorted(leaves or [])}, maps to {mapped})")
      continue
    part: dict[str, np.ndarray] = {}
    hf_layout.convert_module(mapped[1], mapped[0], leaves, part)
    tensors.update({PREFIX + k: v for k, v in part.items()})
    saved.append(mapped[0])
  return tensors, saved, problems


def _lora_config(ranks: dict[str, int], alpha_factors: dict[str, float], candidates: list[str],
                 saved: list[str], dora: set[str]) -> dict[str, Any]:
  """The LoRA part of adapter_config.json (see `peft_tensors`)."""
  r = collections.Counter(ranks.values()).most_common(1)[0][0]
  return {"r": r, "target_modules": _targets(sorted(ranks), candidates),
          "rank_pattern": {_pattern_key(n, candidates): k
                           for n, k in sorted(ranks.items()) if k != r},
          "alpha_factors": {_pattern_key(n, candidates): f
                            for n, f in sorted(alpha_factors.items())},
          "modules_to_save": saved or None, "use_dora": bool(dora)}


def export_peft(module: Any, variables: PyTree, out_dir: str | os.PathLike, *,
                alpha: float | None = None, base_model_name_or_path: str | None = None,
                modules_to_save: Sequence[str] | None = None,
                task_type: str | None = "auto") -> epath.Path:
  """Writes the LoRA adapters of a jtl model as a PEFT adapter folder.

  Args:
    module: the jtl zoo module (Bert, ViT, ResNet, Dinov2) or its `LoraModel`.
    variables: variables whose params hold the adapters.
    out_dir: folder for adapter_config.json and adapter_model.safetensors.
    alpha: LoRA alpha (default: the LoraModel's).
    base_model_name_or_path: the base model's Hub id or folder (recorded).
    modules_to_save: jtl module paths saved whole; default ["head"] when the
      params have a head. For a BERT with pool="mean" the head (on the
      mean-pooled features, which `BertModel` does not have) goes to
      head.safetensors beside the adapter; with pool="cls_pooler" it is
      BertForSequenceClassification's `classifier`.
    task_type: PEFT task type; "auto": FEATURE_EXTRACTION for BERT, SEQ_CLS
      for BertForSequenceClassification, none for timm and DINOv2 (PeftModel
      on the base model's own forward).

  Returns:
    out_dir as an `epath.Path` (a local folder or a bucket URL).
  """
  layout = hf_layout.layout_of(module)
  alpha = getattr(module, "alpha", None) if alpha is None else alpha
  if not (isinstance(alpha, (int, float)) and alpha > 0):
    raise ConfigError(f"export_peft: alpha={alpha!r}; pass the LoRA alpha the adapters "
                      "were trained with (or the LoraModel).")
  params = variables.get("params", variables)
  has_head = "head" in params
  if modules_to_save is None:
    modules_to_save = ["head"] if has_head else []
  modules_to_save = list(modules_to_save)
  bert_head = layout == "bert" and "head" in modules_to_save
  if bert_head:
    modules_to_save.remove("head")
  tensors, lora_cfg = peft_tensors(params, layout, modules_to_save=modules_to_save)
  out = paths.path(out_dir)  # a local folder or a bucket URL
  if bert_head:
    head = hf_layout.to_torch_state_dict({"params": {"head": params["head"]}}, layout)
    hf_export.write_safetensors(head, out / HEAD_FILE)
  task = _TASK_TYPES[layout] if task_type == "auto" else task_type
  config = {
      "peft_type": "LORA", "task_type": task, "base_model_name_or_path": base_model_name_or_path,
      "revision": None, "inference_mode": True, "r": lora_cfg["r"],
      "lora_alpha": float(alpha), "lora_dropout": 0.0, "target_modules": lora_cfg["target_modules"],
      "rank_pattern": lora_cfg["rank_pattern"],
      "alpha_pattern": {k: float(alpha) * f for k, f in lora_cfg["alpha_factors"].items()},
      "modules_to_save": lora_cfg["modules_to_save"], "fan_in_fan_out": False, "bias": "none",
      "use_rslora": False, "use_dora": lora_cfg["use_dora"], "init_lora_weights": True,
      "layers_to_transform": None, "layers_pattern": None,
      "auto_mapping": None if task else _AUTO_MAPPING.get(layout),
  }
  hf_export.write_safetensors(tensors, out / WEIGHTS_FILE)
  paths.write_atomic(out / CONFIG_FILE,
                     (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
  return out
