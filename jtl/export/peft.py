"""LoRA adapters in the Hugging Face PEFT format, out and back in (no torch).

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
`o_proj`), which PEFT saves and matches; import also reads the names of
transformers 4 (`attention.attention.query`, `attention.output.dense`).

timm's ViT fuses query, key and value in one `attn.qkv` Linear; jtl's has
three [width, heads, head_dim] kernels. LoRAs on them (lora_a [width, r],
lora_b [r, heads * head_dim]) export exactly as one qkv LoRA of rank
r_q + r_k + r_v: lora_A = concat(A_q, A_k, A_v), lora_B = block diagonal
(B_q, B_k, B_v), with rank_pattern / alpha_pattern keeping the scale alpha / r.
An adapter split after the heads axis ([width * heads, r] x [r, head_dim], as
`add_lora` makes for a LinearGeneral) exports as rank heads * r, also exactly.

Import reads any LoRA adapter PEFT saved for these layouts: per-layer
rank_pattern / alpha_pattern and rsLoRA scales are folded into B so jtl's
single alpha gives the same update. A qkv adapter becomes adapters on query,
key and value (block-diagonal ones, as jtl writes them, back into the
separate adapters; `fold_unsupported=True` adds it to the kernels instead).

DoRA (`add_lora(..., dora=True)`): the magnitude "lora_magnitude" [out]
exports as PEFT's `<module>.lora_magnitude_vector` ([out] for a
Linear, [1, out, 1, 1] for a Conv2d; PEFT's norm is over the input axes of
the torch weight, jtl's over the adapter's fan_in: the same axes where the
export keeps jtl's rank) with `use_dora: true`; a fused qkv's magnitude is
the concatenation of query's, key's and value's (||W||_c, the identity
rescale, for a projection without an adapter). Import reads it back.

rank_pattern / alpha_pattern keys are matched as PEFT matches them (a regex
on the module name or a part after a "."), but a key is data from a file:
one whose backtracking has no small bound (nested quantifiers such as
`(a+)+`, look-arounds, back-references) is a CheckpointError, not a hang. A
damaged folder (JSON, fields, r = 0, safetensors) is one CheckpointError
naming the file and field.

Which jtl wrapper applies the imported adapters: `LoraModel` runs the ones on
`nn.Dense` / `nn.DenseGeneral` / `nn.Conv` layers (every zoo layer PEFT
adapts, ViT's and DINOv2's attention projections included); `LoraWeights`
and `merge_lora` handle every adapter too.

Example:
  export_peft(lora_model, variables, "adapter/", base_model_name_or_path="timm/...")
  params, alpha = import_peft(variables["params"], "adapter/", layout="timm_vit")
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from etils import epath

from jtl import lora_layout, paths
from jtl import tree as jtree
from jtl.export import hf_export
from jtl.errors import CheckpointError, ConfigError, bullet_list
from jtl.tree import PyTree
from jtl.weights.readers import read

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
HEAD_FILE = "head.safetensors"  # BERT: jtl's head on the mean-pooled features
PREFIX = "base_model.model."
_TASK_TYPES = {"bert": "FEATURE_EXTRACTION", "bert_cls": "SEQ_CLS", "timm_vit": None,
               "timm_resnet": None, "dinov2": None, "dinov2_cls": None}
# Layouts of a task model: its backbone's modules under a prefix, and the
# layout of the backbone alone (an import with the other one gets a hint).
_TASK_MODELS = {"bert_cls": ("bert.", "bert", "BertForSequenceClassification", "BertModel"),
                "dinov2_cls": ("dinov2.", "dinov2", "Dinov2ForImageClassification",
                               "Dinov2Model")}
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
    layout: one of `hf_export.LAYOUTS`.
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
    mapped = hf_export.torch_module(layout, path) if "kernel" in leaves else None
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
    mapped = hf_export.torch_module(layout, path)
    leaves = modules.get(path)
    if mapped is None or not leaves or "lora_a" in leaves:
      problems.append(f"{path}: modules_to_save needs a plain mapped module "
                      f"(found {sorted(leaves or [])}, maps to {mapped})")
      continue
    part: dict[str, np.ndarray] = {}
    hf_export._convert_module(mapped[1], mapped[0], leaves, part)  # pylint: disable=protected-access
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
  layout = hf_export.layout_of(module)
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
    head = hf_export.to_torch_state_dict({"params": {"head": params["head"]}}, layout)
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


# --- import -------------------------------------------------------------------

# --- pattern keys (rank_pattern / alpha_pattern) ----------------------------------
# PEFT matches a key as `re.match(rf"(.*\.)?({key})$", name)`: the key, a regex,
# must match the whole module name or a part of it that starts after a ".". A
# key comes from a file, so it is data: jtl matches it the same way, but first
# bounds what backtracking can cost (nested or many repetitions, `(a+)+` or
# `(a|a)*`, take exponential time), so a hostile key is an error, not a hang.
_MAX_KEY_CHARS = 1000
_MAX_MATCH_STEPS = 2_000_000  # bound on the paths backtracking can try per name
_SINGLE = {"LITERAL", "NOT_LITERAL", "ANY", "IN"}  # one character each
try:  # Python >= 3.11
  from re import _parser as _sre_parse  # pylint: disable=g-import-not-at-top
except ImportError:  # pragma: no cover
  import sre_parse as _sre_parse  # pylint: disable=g-import-not-at-top,deprecated-module


def _regex_cost(items: Any, n: int) -> int:
  """Upper bound on the paths backtracking tries for parsed `items` on a
  string of n characters; ValueError for constructs with no such bound."""
  cost = 1
  for op, arg in items:
    name = str(op)
    if name in _SINGLE or name == "AT":
      continue
    if name == "SUBPATTERN":
      cost *= _regex_cost(arg[-1], n)
    elif name == "ATOMIC_GROUP":
      cost *= _regex_cost(arg, n)
    elif name == "BRANCH":
      cost *= sum(_regex_cost(alt, n) for alt in arg[1])
    elif name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
      low, high, body = arg
      if not all(str(o) in _SINGLE or (str(o) == "SUBPATTERN" and all(
          str(x) in _SINGLE for x, _ in a[-1])) for o, a in body):
        raise ValueError("a repetition of something other than fixed characters "
                         "(nested quantifiers or alternatives, e.g. (a+)+ or (a|b)*)")
      cost *= max(1, min(high, n) - low + 1)
    else:
      raise ValueError(f"{name.lower()} (jtl matches plain regular expressions: no "
                       "look-arounds, back-references or conditionals)")
    cost = min(cost, _MAX_MATCH_STEPS + 1)
  return cost


class _PatternKey:
  """One rank_pattern / alpha_pattern key, matched as PEFT does, bounded."""

  def __init__(self, key: Any, field: str, where: str):
    self.key, self.where = key, f"{where}: {CONFIG_FILE} {field} key {str(key)[:80]!r}"
    if not isinstance(key, str) or not key or len(key) > _MAX_KEY_CHARS:
      raise CheckpointError(f"{self.where}: a key must be a module name or regex of 1 to "
                            f"{_MAX_KEY_CHARS} characters.")
    try:
      self.regex = re.compile(key)
      self.parsed = _sre_parse.parse(key)
      _regex_cost(self.parsed, 64)
    except (re.error, ValueError, RecursionError, OverflowError) as e:
      raise CheckpointError(f"{self.where}: not a usable regex ({e}). Use module names "
                            "(e.g. 'encoder.layer.0.attention.self.query') or simple "
                            "patterns such as 'layer\\.\\d+\\.output\\.dense'.") from None

  def matches(self, name: str) -> bool:
    """True when the key matches `name` or a part of it after a "."."""
    starts = [0] + [i + 1 for i, c in enumerate(name) if c == "."]
    if len(starts) * _regex_cost(self.parsed, len(name)) > _MAX_MATCH_STEPS:
      raise CheckpointError(f"{self.where}: matching it against module {name!r} could "
                            "take too long (many repetitions); use plain module names.")
    return any(self.regex.fullmatch(name, start) for start in starts)


def _pattern_keys(config: Mapping[str, Any], field: str, where: str, *, integer: bool
                  ) -> list[tuple[_PatternKey, float]]:
  """The checked (key, value) pairs of config[field] (a {regex: number} map)."""
  patterns = config.get(field)
  if patterns is None:
    return []
  if not isinstance(patterns, dict):
    raise CheckpointError(f"{where}: {CONFIG_FILE} {field} is {type(patterns).__name__}; "
                          "expected an object {module name or regex: number}.")
  out = []
  for key, value in patterns.items():
    pattern = _PatternKey(key, field, where)
    if not _positive(value, integer):
      raise CheckpointError(f"{pattern.where}: value {value!r:.40}; expected a positive "
                            f"{'integer' if integer else 'number'}.")
    out.append((pattern, value))
  return out


def _pattern_value(patterns: Sequence[tuple[_PatternKey, Any]], name: str, default: Any) -> Any:
  """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key):
  the value of the first key that matches `name`, else `default`."""
  for key, value in patterns:
    if key.matches(name):
      return value
  return default


def _positive(value: Any, integer: bool) -> bool:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return False
  return value > 0 and math.isfinite(value) and (not integer or float(value).is_integer())


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(adapter_config.json, {key: array}) of a PEFT adapter folder.

  Raises:
    CheckpointError: a file is missing, not JSON / not an object, or not a
      readable safetensors file (named, with what is wrong).
  """
  folder = Path(path)
  missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / f).is_file()]
  if missing:
    raise CheckpointError(f"{folder}: not a PEFT adapter folder (missing {missing}); "
                          "expected the output of PeftModel.save_pretrained.")
  try:
    config = json.loads((folder / CONFIG_FILE).read_bytes())
  except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
    raise CheckpointError(f"{folder / CONFIG_FILE}: not a readable JSON file ({e}); "
                          "save the adapter again (PeftModel.save_pretrained).") from None
  if not isinstance(config, dict):
    raise CheckpointError(f"{folder / CONFIG_FILE}: a JSON {type(config).__name__}, "
                          "expected an object (the LoraConfig's fields).")
  return config, _read_tensors(folder / WEIGHTS_FILE)


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
  """A safetensors file through jtl's bounded reader (CheckpointError if damaged)."""
  return read(path, format="safetensors")


class _Settings(NamedTuple):
  """The adapter_config.json fields import uses, checked."""
  alpha: float
  rank: int | None  # "r": PEFT's rank where rank_pattern names none
  rslora: bool
  dora: bool
  alpha_pattern: list[tuple[_PatternKey, float]]
  rank_pattern: list[tuple[_PatternKey, float]]


def _check_config(config: Mapping[str, Any], where: str) -> _Settings:
  """The import settings of adapter_config.json; CheckpointError naming the
  fields this LoRA variant or a damaged file gets wrong."""
  bad = []
  if config.get("peft_type") != "LORA":
    bad.append(f"peft_type {config.get('peft_type')!r:.60} (jtl reads 'LORA')")
  if config.get("use_dora") not in (True, False, None):
    bad.append(f"use_dora={config.get('use_dora')!r:.60} (expected true or false)")
  for key, ok in (("fan_in_fan_out", False), ("lora_bias", False)):
    if config.get(key, ok) not in (ok, None):
      bad.append(f"{key}={config.get(key)!r:.60} (jtl's LoRA has {key}={ok})")
  if config.get("bias", "none") not in ("none", None):
    bad.append(f"bias={config.get('bias')!r:.60} (jtl reads bias='none')")
  if bad:
    raise CheckpointError(f"{where}: this adapter uses what jtl's LoRA does not "
                          "implement:\n" + bullet_list(bad))
  file = f"{where}: {CONFIG_FILE}"
  alpha, rank, rslora = config.get("lora_alpha", 8), config.get("r"), config.get("use_rslora")
  if not _positive(alpha, integer=False):
    raise CheckpointError(f"{file} lora_alpha={alpha!r:.40}; expected a positive number.")
  if rank is not None and not _positive(rank, integer=True):
    raise CheckpointError(f"{file} r={rank!r:.40}; expected a positive integer.")
  if rslora not in (True, False, None):
    raise CheckpointError(f"{file} use_rslora={rslora!r:.40}; expected true or false.")
  return _Settings(float(alpha), None if rank is None else int(rank), bool(rslora),
                   config.get("use_dora") is True,
                   _pattern_keys(config, "alpha_pattern", where, integer=False),
                   _pattern_keys(config, "rank_pattern", where, integer=True))


def _lora_pair(name: str, part: Mapping[str, np.ndarray], settings: _Settings
               ) -> tuple[np.ndarray, np.ndarray, float] | str:
  """(lora_A, lora_B, PEFT's scale) of one adapter; a problem string if the
  file's tensors or its config cannot be that adapter."""
  want_keys = {"lora_A.weight", "lora_B.weight"} | ({_MAGNITUDE} if settings.dora else set())
  if set(part) != want_keys:
    return (f"expected {sorted(want_keys)} (use_dora={settings.dora}), found {sorted(part)}")
  a, b = part["lora_A.weight"], part["lora_B.weight"]
  if a.ndim < 2 or b.ndim < 2 or a.shape[0] == 0 or b.shape[1] != a.shape[0]:
    return (f"lora_A {a.shape} / lora_B {b.shape} are not a LoRA pair (expected "
            "[r, in, ...] / [out, r, ...] with r > 0)")
  r = a.shape[0]
  want = _pattern_value(settings.rank_pattern, name, settings.rank)
  if want is not None and want != r:
    return (f"{CONFIG_FILE} gives rank {want} (r / rank_pattern), but lora_A has rank {r}; "
            "the config and the weights are from different adapters")
  lora_alpha = _pattern_value(settings.alpha_pattern, name, settings.alpha)
  return a, b, lora_alpha / (math.sqrt(r) if settings.rslora else r)


def _torch_to_jtl(flat: Mapping[str, Any], layout: str) -> dict[str, list[str]]:
  """torch module name (in memory, and as saved where they differ) -> the jtl
  module paths (with a kernel) it covers."""
  out: dict[str, list[str]] = {}
  for module, leaves in _modules(flat).items():
    mapped = hf_export.torch_module(layout, module) if "kernel" in leaves else None
    if mapped is not None:
      out.setdefault(mapped[0], []).append(module)
      saved = hf_export.saved_name(layout, mapped[0])
      if saved != mapped[0]:
        out.setdefault(saved, []).append(module)
  return out


def _group(tensors: Mapping[str, np.ndarray], where: str) -> dict[str, dict[str, np.ndarray]]:
  groups: dict[str, dict[str, np.ndarray]] = {}
  for key, value in tensors.items():
    if not key.startswith(PREFIX):
      raise CheckpointError(f"{where}: key {key!r} does not start with {PREFIX!r}.")
    m = re.fullmatch(r"(.+?)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?"
                     r"|weight|bias)", key[len(PREFIX):])
    if m is None:
      raise CheckpointError(f"{where}: key {key!r} is not a LoRA, DoRA or module_to_save "
                            "tensor (lora_embedding is not supported).")
    leaf = _MAGNITUDE if m.group(2).startswith(_MAGNITUDE) else m.group(2)
    groups.setdefault(m.group(1), {})[leaf] = value
  return groups


def _task_model_names(groups: dict[str, dict[str, np.ndarray]], layout: str, where: str
                      ) -> dict[str, dict[str, np.ndarray]]:
  """BERT adapters PEFT saved for a task model (BertForSequenceClassification
  ...: "bert.encoder...", "bert.pooler.dense") imported with layout "bert"
  under BertModel's names. Its classifier reads the [CLS] pooler output, the
  head of layout "bert" the mean-pooled features: a CheckpointError naming
  the model kwarg and layout that load it whole, not a silently different
  head."""
  if layout != "bert" or not any(n.startswith("bert.") for n in groups):
    return groups
  other = sorted(n for n in groups if not n.startswith("bert."))
  if other:
    raise CheckpointError(
        f"{where}: an adapter of a BERT task model (keys under 'bert.') also saves {other}: "
        "BertForSequenceClassification's classifier reads the [CLS] pooler output, the head "
        "of layout='bert' the mean-pooled features. To load it as the head, build the Bert "
        "with pool='cls_pooler' (model_kwargs={'pool': 'cls_pooler'}) and import with "
        "layout='bert_cls' (hf_export.layout_of(model)); or remove those tensors from "
        f"{WEIGHTS_FILE} to import the encoder's adapters alone.")
  return {n[len("bert."):]: part for n, part in groups.items()}


def _import_lora(flat: dict[str, Any], jtl_paths: list[str], kind: str, a: np.ndarray,
                 b: np.ndarray, scale: float, alpha: float, fold: bool,
                 magnitude: np.ndarray | None = None) -> str | None:
  """Puts one PEFT adapter (and DoRA magnitude) into `flat`; a problem or None."""
  r = a.shape[0]
  if magnitude is not None:
    magnitude = np.asarray(magnitude, np.float32).reshape(-1)
    if kind == "qkv" and fold:
      return "fold_unsupported cannot fold a DoRA qkv adapter (its magnitude rescales W)"
  if kind == "qkv" and fold:
    delta = (b.reshape(b.shape[0], r) @ a.reshape(r, -1)) * scale  # [3 * width, width]
    width = delta.shape[0] // 3
    for i, path in enumerate(sorted(jtl_paths, key=lambda p: _QKV.index(p.rsplit("/", 1)[-1]))):
      kernel = np.asarray(flat[f"{path}/kernel"])
      part = delta[i * width:(i + 1) * width].T.reshape(kernel.shape)
      flat[f"{path}/kernel"] = (kernel + part).astype(kernel.dtype)
    return None
  if kind == "qkv":
    return _import_qkv(flat, jtl_paths, a, b, scale, alpha, magnitude)
  path = jtl_paths[0]
  kernel = np.asarray(flat[f"{path}/kernel"])
  if kind == "conv":
    if a.ndim != 4 or b.shape[2:] != (1, 1):
      return f"{path}: conv adapter shapes {a.shape} / {b.shape}, expected [r, in, kh, kw] / [out, r, 1, 1]"
    lora_a = np.transpose(a, (2, 3, 1, 0)).reshape(-1, r)
    lora_b = b[:, :, 0, 0].T
  else:
    lora_a, lora_b = a.T, b.T
  split = 1 if kind == "linear_heads" else kernel.ndim - 1  # jtl's fan_in x out
  fan_in, out = math.prod(kernel.shape[:split]), math.prod(kernel.shape[split:])
  if lora_a.shape != (fan_in, r) or lora_b.shape != (r, out):
    return (f"{path}: adapter [{fan_in}? x {r}] x [{r} x {out}?] does not fit kernel "
            f"{tuple(kernel.shape)} (file: lora_A {a.shape}, lora_B {b.shape})")
  if magnitude is not None and magnitude.shape != (out,):
    return f"{path}: DoRA magnitude of {magnitude.size} values, expected {out}"
  factor = scale / (alpha / r)  # jtl applies alpha / r; PEFT may differ per layer
  flat[f"{path}/lora_a"] = np.ascontiguousarray(lora_a, np.float32)
  flat[f"{path}/lora_b"] = np.ascontiguousarray(lora_b * factor, np.float32)
  if magnitude is not None:
    flat[f"{path}/lora_magnitude"] = magnitude
  return None


def _import_qkv(flat: dict[str, Any], jtl_paths: list[str], a: np.ndarray, b: np.ndarray,
                scale: float, alpha: float, magnitude: np.ndarray | None = None) -> str | None:
  """timm's fused qkv adapter (A [R, width], B [3 * width, R]) -> adapters on
  jtl's query, key and value: A_p [width, r_p] / B_p [r_p, heads * head_dim].

  When B is block diagonal (the columns each projection's rows use are
  disjoint, as `export_peft` writes), each projection gets its own columns
  (rank r_p, exactly the adapters exported); otherwise (a qkv adapter PEFT
  trained) each gets all R columns: the same A and its rows of B. Either way
  the update is exactly PEFT's; B carries PEFT's scale over jtl's alpha / r_p.
  A DoRA magnitude [3 * width] splits into the three projections' (each one
  then gets an adapter, so that each has its magnitude).
  """
  paths = sorted(jtl_paths, key=lambda p: _QKV.index(p.rsplit("/", 1)[-1]))
  kernels = [np.asarray(flat[f"{p}/kernel"]) for p in paths]
  outs = [math.prod(k.shape[1:]) for k in kernels]
  if (len(paths) != 3 or a.ndim != 2 or b.ndim != 2 or b.shape != (sum(outs), a.shape[0])
      or any(k.shape[0] != a.shape[1] for k in kernels)):
    return (f"qkv adapter lora_A {a.shape} / lora_B {b.shape} does not fit the kernels "
            f"{[tuple(k.shape) for k in kernels]} of {paths}")
  starts = np.cumsum([0, *outs])
  rows = [b[starts[i]:starts[i + 1]] for i in range(3)]
  used = [np.flatnonzero(np.any(part != 0, axis=0)) for part in rows]
  disjoint = sum(len(u) for u in used) == len(set().union(*map(set, used)))
  if magnitude is not None and magnitude.shape != (sum(outs),):
    return f"qkv DoRA magnitude of {magnitude.size} values, expected {sum(outs)}"
  if not (disjoint and any(len(u) for u in used) and (magnitude is None or all(map(len, used)))):
    used = [np.arange(a.shape[0])] * 3
  for i, (path, part, cols) in enumerate(zip(paths, rows, used)):
    if magnitude is not None:
      flat[f"{path}/lora_magnitude"] = magnitude[starts[i]:starts[i + 1]]
    if not len(cols):  # no update on this projection
      continue
    r_p = len(cols)
    flat[f"{path}/lora_a"] = np.ascontiguousarray(a[cols].T, np.float32)
    factor = scale / (alpha / r_p)
    lora_b = part[:, cols].T
    flat[f"{path}/lora_b"] = np.ascontiguousarray(lora_b if factor == 1 else lora_b * factor,
                                                  np.float32)
  return None


def import_peft(params: PyTree, path: str | os.PathLike, *, layout: str,
                fold_unsupported: bool = False) -> tuple[dict[str, Any], float]:
  """Loads a PEFT LoRA adapter folder into jtl params.

  Args:
    params: the base model's jtl params (a head of the saved size if the
      adapter saves one).
    path: the folder PeftModel.save_pretrained (or `export_peft`) wrote.
    layout: "bert" (an adapter of BertModel; of a task model, its encoder's
      adapters), "bert_cls" (BertForSequenceClassification, into a Bert with
      pool="cls_pooler" and a head), "timm_vit", "timm_resnet", "dinov2" (an
      adapter of Dinov2Model) or "dinov2_cls" (Dinov2ForImageClassification);
      `hf_export.layout_of(model)` gives the model's; see `hf_export.LAYOUTS`.
    fold_unsupported: add the update of timm's fused qkv adapters to the
      query/key/value kernels instead of making adapters on them.

  Returns:
    (params with "lora_a"/"lora_b" leaves (and "lora_magnitude" for a DoRA
    adapter, `use_dora: true`) and the saved modules, alpha).
    Run with `LoraWeights(model, alpha)` / `merge_lora(params, alpha)`.

  Raises:
    CheckpointError: keys that map to no module, shapes that do not fit, or
      LoRA variants jtl does not implement; all listed together.
  """
  hf_export._check_layout(layout)  # pylint: disable=protected-access
  config, tensors = read_adapter(path)
  settings = _check_config(config, str(path))
  alpha = settings.alpha
  flat = dict(jtree.flatten(params))
  owners = _torch_to_jtl(flat, layout)
  problems: list[str] = []
  # Every adapter is imported, BERT's pooler's included: jtl's features
  # mean-pool, but the pooler's merged kernel is exported for transformers.
  for name, part in sorted(_task_model_names(_group(tensors, str(path)), layout,
                                             str(path)).items()):
    paths = owners.get(name, [])
    mapped = hf_export.torch_module(layout, paths[0]) if paths else None
    if mapped is None:
      problems.append(f"{name}: no module of the jtl model maps to it ({sorted(part)})")
      continue
    kind = mapped[1]
    if "lora_A.weight" in part or "lora_B.weight" in part or _MAGNITUDE in part:
      pair = _lora_pair(name, part, settings)
      if isinstance(pair, str):
        problems.append(f"{name}: {pair}")
        continue
      problem = _import_lora(flat, paths, kind, *pair, alpha, fold_unsupported,
                             part.get(_MAGNITUDE))
      if problem:
        problems.append(f"{name}: {problem}")
    else:  # a module in modules_to_save: its whole weights
      problems += _import_module(flat, paths[0], kind, part, name)
  if layout == "bert" and (Path(path) / HEAD_FILE).is_file():
    head = _read_tensors(Path(path) / HEAD_FILE)
    problems += _import_module(flat, "head", "linear",
                               {k.rpartition(".")[2]: v for k, v in head.items()}, HEAD_FILE)
  if problems:
    raise CheckpointError(f"{path}: the PEFT adapter does not fit these {layout} params:\n"
                          + bullet_list(problems) + "\nLoad it into the model it was "
                          "trained for (same sizes; a head of the saved size)."
                          + _layout_hint(layout, tensors, str(path)))
  return jtree.unflatten(flat), alpha


def _layout_hint(layout: str, tensors: Mapping[str, np.ndarray], where: str) -> str:
  """Which layout the keys say, where it is another task model's or backbone's
  (layout "bert" reads a task model's encoder adapters too: no hint)."""
  for task, (prefix, backbone, task_class, backbone_class) in _TASK_MODELS.items():
    if layout not in (task, backbone) or layout == "bert":
      continue
    prefixed = any(name.startswith(prefix) for name in _group(tensors, where))
    other = task if prefixed else backbone
    if other != layout:
      return (f" The keys are {'' if prefixed else 'not '}under {prefix!r}: an adapter of "
              f"{task_class if prefixed else backbone_class}, layout={other!r}.")
  return ""


def _import_module(flat: dict[str, Any], path: str, kind: str, part: Mapping[str, np.ndarray],
                   name: str) -> list[str]:
  """A whole saved module (modules_to_save) -> jtl leaves; returns problems."""
  problems = []
  linear = kind in ("linear", "linear_heads")
  for leaf, value in part.items():
    if leaf not in ("weight", "bias") or (kind == "conv" and leaf == "weight" and value.ndim != 4):
      problems.append(f"{name}.{leaf}: shape {value.shape} is not a module's weight [.., ..] "
                      "or bias")
      continue
    jtl_leaf = ("bias" if leaf == "bias" else "kernel" if linear or kind == "conv"
                else "scale")
    target = f"{path}/{jtl_leaf}"
    if target not in flat:
      problems.append(f"{name}.{leaf}: the params have no {target}")
      continue
    old = np.asarray(flat[target])
    new = (value.T if linear and leaf == "weight" else
           np.transpose(value, (2, 3, 1, 0)) if kind == "conv" and leaf == "weight" else value)
    if linear and new.size == old.size:  # [in, heads, head_dim] kernels and biases
      new = new.reshape(old.shape)
    if new.shape != old.shape:
      problems.append(f"{name}.{leaf}: shape {value.shape} does not fit {target} {old.shape}")
      continue
    flat[target] = np.asarray(new, old.dtype)
  return problems
