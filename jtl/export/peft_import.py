"""PEFT LoRA adapter folders read into jtl params (no torch).

`read_adapter` reads a folder (config and tensors), `import_peft` puts its
adapters and saved modules into a jtl model's params. The format, its file
names and the module names per layout are `jtl.export.peft`'s (what
`export_peft` writes).

Import reads any LoRA adapter PEFT saved for these layouts: per-layer
rank_pattern / alpha_pattern and rsLoRA scales are folded into B so jtl's
single alpha gives the same update. A qkv adapter becomes adapters on query,
key and value (block-diagonal ones, as jtl writes them, back into the
separate adapters; `fold_unsupported=True` adds it to the kernels instead).
DINOv2 adapters are read under transformers 5's module names and 4's; a DoRA
adapter's `lora_magnitude_vector` becomes "lora_magnitude".

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
  params, alpha = import_peft(variables["params"], "adapter/", layout="timm_vit")
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from jtl import tree as jtree
from jtl.errors import CheckpointError, bullet_list
from jtl.export import hf_layout
from jtl.export.peft import _MAGNITUDE, _QKV, CONFIG_FILE, HEAD_FILE, PREFIX, WEIGHTS_FILE, _modules
from jtl.tree import PyTree
from jtl.weights.readers import read

# Layouts of a task model: its backbone's modules under a prefix, and the
# layout of the backbone alone (an import with the other one gets a hint).
_TASK_MODELS = {"bert_cls": ("bert.", "bert", "BertForSequenceClassification", "BertModel"),
                "dinov2_cls": ("dinov2.", "dinov2", "Dinov2ForImageClassification",
                               "Dinov2Model")}

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
    mapped = hf_layout.torch_module(layout, module) if "kernel" in leaves else None
    if mapped is not None:
      out.setdefault(mapped[0], []).append(module)
      saved = hf_layout.saved_name(layout, mapped[0])
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
        "layout='bert_cls' (hf_layout.layout_of(model)); or remove those tensors from "
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
      `hf_layout.layout_of(model)` gives the model's; see `hf_layout.LAYOUTS`.
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
  hf_layout.check_layout(layout)
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
    mapped = hf_layout.torch_module(layout, paths[0]) if paths else None
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

