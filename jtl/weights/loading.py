"""`load_pretrained`: put checkpoint arrays into fresh model variables, with a report.

>>> import numpy as np
>>> like = {"params": {"w": np.zeros((2, 2), np.float32),
...                    "head": {"kernel": np.zeros((2, 10), np.float32)}}}
>>> src = {"w": np.ones((2, 2)), "head/kernel": np.ones((2, 1000))}
>>> variables, report = load_pretrained(src, like)
>>> float(variables["params"]["w"][0, 0]), variables["params"]["w"].dtype
(1.0, dtype('float32'))
>>> report.reinitialised[0].note
'checkpoint has 1000 classes, model 10: re-initialised'
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import numpy as np

from jtl import tree as tree_lib
from jtl.adapter import is_nnx_module, update_module, variables_of
from jtl.weights.adapt import adapt_input_conv, resize_pos_embed
from jtl.weights.formats import to_flat_arrays
from jtl.weights.readers import MAX_EXPANSION, read, select
from jtl.errors import JtlError, LoadError, bullet_list

Shape = tuple[int, ...]
Adapter = Callable[[np.ndarray, Shape], np.ndarray]


class Entry(NamedTuple):
  """One leaf in a LoadReport: its path, source and model shapes, a note."""
  path: str
  source_shape: Shape | None = None
  model_shape: Shape | None = None
  note: str = ""

  def __str__(self) -> str:
    shapes = " -> ".join(str(s) for s in (self.source_shape, self.model_shape)
                         if s is not None)
    return f"{self.path} {shapes}" + (f" ({self.note})" if self.note else "")


@dataclasses.dataclass(frozen=True)
class LoadReport:
  """What `load_pretrained` did with every leaf of the model and the source.

  Attributes:
    loaded: model leaves set from the checkpoint.
    skipped: leaves matched by `skip` (model keeps its init), and head leaves
      of the checkpoint that the model does not have.
    missing: model leaves absent from the checkpoint (kept from init).
    unexpected: checkpoint leaves (after conversion) the model does not have.
    mismatched: leaves whose shapes differ (kept from init when not strict).
    reinitialised: head leaves whose class count differs (kept from init).
    adapted: leaves reshaped by an adapter (position embeddings, input conv).
    cast: loaded leaves whose dtype was changed.
    renamed: checkpoint leaves read under the model's collection name: a
      Linen checkpoint's "batch_stats/..." as an NNX model's "state/...".
  """
  loaded: tuple[Entry, ...] = ()
  skipped: tuple[Entry, ...] = ()
  missing: tuple[Entry, ...] = ()
  unexpected: tuple[Entry, ...] = ()
  mismatched: tuple[Entry, ...] = ()
  reinitialised: tuple[Entry, ...] = ()
  adapted: tuple[Entry, ...] = ()
  cast: tuple[Entry, ...] = ()
  renamed: tuple[Entry, ...] = ()

  @property
  def ok(self) -> bool:
    """True when nothing is missing, unexpected or mismatched."""
    return not (self.missing or self.unexpected or self.mismatched)

  def __str__(self, limit: int = 3) -> str:
    lines = [f"{'category':<14}{'count':>6}  first paths"]
    for field in dataclasses.fields(self):
      entries = getattr(self, field.name)
      first = "; ".join(str(e) for e in entries[:limit])
      more = f"; ... {len(entries) - limit} more" if len(entries) > limit else ""
      lines.append(f"{field.name:<14}{len(entries):>6}  {first}{more}".rstrip())
    return "\n".join(lines)


def _strip_collection(path: str) -> str:
  return path.split("/", 1)[1] if "/" in path else path


def _posemb_adapter(src: np.ndarray, shape: Shape) -> np.ndarray | None:
  if src.ndim != 3 or len(shape) != 3 or src.shape[0] != 1 or shape[0] != 1 \
      or src.shape[2] != shape[2]:
    return None
  for prefix in (0, 1):
    old, new = src.shape[1] - prefix, shape[1] - prefix
    if old > 0 and new > 0 and round(old**.5)**2 == old and round(new**.5)**2 == new:
      return resize_pos_embed(src, round(new**.5), num_prefix_tokens=prefix)
  return None


def _input_conv_adapter(src: np.ndarray, shape: Shape) -> np.ndarray | None:
  if src.ndim != 4 or len(shape) != 4 or src.shape[2] != 3:
    return None
  if src.shape[:2] + src.shape[3:] != shape[:2] + shape[3:]:
    return None
  return adapt_input_conv(src, shape[2])


DEFAULT_ADAPTERS: tuple[tuple[str, Adapter], ...] = (
    (r"(.*/)?(pos_?embed\w*|posemb\w*)(/.*)?", _posemb_adapter),
    (r"params/(.*/)?(stem|conv_?stem|conv1|embedding|patch_embed|conv_root)"
     r"(/.*)?/kernel", _input_conv_adapter),
)


def _as_flat_source(source: Any, **read_kwargs: Any) -> dict[str, np.ndarray]:
  if isinstance(source, Mapping):
    flat = to_flat_arrays(source, "source")
    return select(flat, read_kwargs["subtree"], "the given arrays") \
        if read_kwargs.get("subtree") else flat
  return read(source, **read_kwargs)


def _converted_source(source: Any, converter: Callable[[Mapping[str, np.ndarray]],
                                                       Mapping[str, Any]] | None,
                      **read_kwargs: Any) -> dict[str, np.ndarray]:
  """The source as a flat {name: array} dict, through the converter if given."""
  flat_src = _as_flat_source(source, **read_kwargs)
  if converter is None:
    return flat_src
  try:
    flat_src = dict(converter(flat_src))
  except JtlError:
    raise
  except Exception as e:  # name the converter and source
    raise LoadError(
        f"The converter {getattr(converter, '__name__', converter)} failed "
        f"on {source if not isinstance(source, Mapping) else 'the source'}: "
        f"{type(e).__name__}: {e}. Is this the checkpoint the converter "
        "expects?") from e
  return {k: np.asarray(v) for k, v in flat_src.items()}


def _with_collections(flat_src: dict[str, np.ndarray], flat_like: Mapping[str, Any],
                      renamed: list[Entry]) -> dict[str, np.ndarray]:
  """The source's names as the model's paths: "params/" before them when none
  starts with a collection of the model; a Linen checkpoint's "batch_stats/"
  as "state/" for an NNX model's variables (each one listed in `renamed`)."""
  collections = {p.split("/")[0] for p in flat_like}
  found = {k.split("/")[0] for k in flat_src}
  if "params" in collections and not found & collections:
    return {f"params/{k}": v for k, v in flat_src.items()}
  # Not "state" -> "batch_stats": "state/" also heads a saved training state.
  if not ({"state", "batch_stats"} & collections == {"state"}
          and {"state", "batch_stats"} & found == {"batch_stats"}):
    return flat_src
  out = {}
  for name, value in flat_src.items():
    if name.startswith("batch_stats/"):
      path = "state/" + name[len("batch_stats/"):]
      model_leaf = flat_like.get(path)
      renamed.append(Entry(path, value.shape, None if model_leaf is None else
                           tuple(model_leaf.shape), f"the checkpoint's {name}"))
      name = path
    out[name] = value
  return out


@dataclasses.dataclass(frozen=True)
class _Rules:
  """How leaves are matched: skip patterns, the head regex, adapters, a dtype."""
  skip: Sequence[str]
  reinit_head: str | None
  adapters: Sequence[tuple[str, Adapter]]
  dtype: Any

  def skipped(self, path: str) -> bool:
    return any(re.fullmatch(p, path) or re.fullmatch(p, _strip_collection(path))
               for p in self.skip)

  def is_head(self, path: str) -> bool:
    # Only "params/" comes off: a bare params tree's first name is a module
    # ("encoder/head/w" is not a head), and a head is params.
    return self.reinit_head is not None and any(
        re.fullmatch(self.reinit_head, p) for p in (path, path.removeprefix("params/")))


def load_pretrained(
    source: Any, like: Any, *,
    converter: Callable[[Mapping[str, np.ndarray]], Mapping[str, Any]] | None = None,
    skip: Sequence[str] = (), strict: bool = True,
    reinit_head: str | None = r"head/.*", dtype: Any = None,
    adapt: bool | Sequence[tuple[str, Adapter]] = True,
    init: Callable[[Sequence[str]], Mapping[str, Any]] | None = None,
    subtree: str | None = None, max_expansion: float | None = MAX_EXPANSION,
) -> tuple[Any, LoadReport]:
  """Returns `like` with its leaves replaced by the checkpoint's, and a report.

  Args:
    source: anything `read` accepts, or an already-read (flat or nested)
      dict of arrays.
    like: freshly initialised variables, e.g. {"params": ..., "batch_stats":
      ...} (or an apply function's params); gives the structure, shapes, dtypes
      and the values kept for leaves that are not loaded. Its leaves may be
      abstract (anything with `shape` and `dtype` that is not an array, e.g. the
      `jax.ShapeDtypeStruct`s of `jax.eval_shape(module.init, ...)`): then
      `init` makes only the leaves the checkpoint does not provide, and no
      memory is spent on an init of the leaves it does. Or an NNX module: its
      variables (`jtl.adapter.variables_of`: "params/...", "state/...") are
      loaded and written into it (`jtl.adapter.update_module`), and the module
      is returned; nothing is written when the load fails.
    converter: maps the source's flat dict to model paths ({"params/...":
      array, "batch_stats/...": array}). Its names, or the source's without
      it, get "params/" before them when none starts with a collection of the
      model; for a model with "state" but no "batch_stats" (an NNX model's),
      "batch_stats/" names are read as "state/" (listed as `renamed`).
    skip: regexes; matching leaves (full path, or path without the collection)
      keep their init and are listed as skipped.
    strict: raise one LoadError for anything missing, unexpected or
      mismatched; False keeps init values for those and reports them.
    reinit_head: regex of the classifier head, matched against the path and
      the path without "params/" (so the default fits "params/head/..." and a
      bare params tree's "head/..."); when
      only its class count (last axis) differs, the model's init is kept and
      reported as reinitialised.
    dtype: cast loaded floating arrays to this dtype; by default they are cast
      to the dtype of the corresponding `like` leaf.
    adapt: True applies the built-in adapters (ViT position-embedding resize,
      first-conv input channels) to shape mismatches of matching paths; False
      none; or a sequence of (regex, fn(source_array, model_shape) -> array).
    init: for abstract `like` leaves: `init(paths) -> {path: array}`, called
      once with the paths of every abstract leaf that is not loaded (a new
      head, skipped or, when not strict, missing leaves); not called when
      the checkpoint provides them all.
    subtree, max_expansion: as `jtl.weights.read`: only the names under this
      prefix, stripped (e.g. "state" for a saved training state); the most
      bytes of arrays a file may yield per byte on disk (None: no limit).

  Returns:
    (variables with the structure of `like`, holding numpy arrays, or the NNX
    module `like` holding the loaded weights; LoadReport)
  """
  nnx_module = like if is_nnx_module(like) else None
  like = variables_of(nnx_module) if nnx_module is not None else _checked_like(like)
  flat_src = _converted_source(source, converter, subtree=subtree,
                               max_expansion=max_expansion)
  adapters = list(DEFAULT_ADAPTERS) if adapt is True else list(adapt or ())
  rules = _Rules(skip=skip, reinit_head=reinit_head, adapters=adapters, dtype=dtype)
  variables, report = _load(source, flat_src, like, rules, strict, init)
  if nnx_module is not None:
    return update_module(nnx_module, variables), report
  return variables, report


def _checked_like(like: Any) -> Any:
  """`like`, unless it is a model that keeps its variables outside (a LoadError)."""
  if getattr(like, "jtl_adapter", False) or isinstance(like, nn.Module) or callable(like):
    raise LoadError(
        f"load_pretrained(source, like=<{type(like).__name__}>): `like` must be the "
        "model's variables or an NNX module, not a model that keeps its variables "
        "outside: pass module.init(rng, x) (or jax.eval_shape of it) for a Linen module, "
        "the params for an apply function, jtl.adapter.variables_of(model) for an "
        "NnxModel (or the NNX module itself).")
  return like


def _load(source: Any, flat_src: dict[str, np.ndarray], like: Any, rules: _Rules,
          strict: bool, init: Callable[[Sequence[str]], Mapping[str, Any]] | None
          ) -> tuple[Any, LoadReport]:
  """`load_pretrained` on variables `like`, from the (converted) flat source."""
  flat_like = tree_lib.flatten(like)
  cats: dict[str, list[Entry]] = {f.name: [] for f in dataclasses.fields(LoadReport)}
  flat_src = _with_collections(flat_src, flat_like, cats["renamed"])
  source_has_head = any(rules.is_head(p) for p in flat_src)
  out = {path: _place_leaf(path, leaf, flat_src, rules, source_has_head, cats)
         for path, leaf in flat_like.items()}
  _report_source_only(flat_src, flat_like, rules, cats)
  report = LoadReport(**{k: tuple(v) for k, v in cats.items()})
  if strict and not report.ok:
    raise LoadError(strict_message(source, report, _naming_hint(report)), report=report)
  _materialise(out, init)
  return tree_lib.map_with_path(lambda p, _: out[p], like), report


def _place_leaf(path: str, model_leaf: Any, flat_src: Mapping[str, np.ndarray],
                rules: _Rules, source_has_head: bool, cats: dict[str, list[Entry]]) -> Any:
  """The value of one model leaf: the checkpoint's (adapted, cast) or the init's.

  Appends the leaf's entry to `cats`.
  """
  model_leaf = model_leaf if _is_abstract(model_leaf) else np.asarray(model_leaf)
  if rules.skipped(path):
    src = flat_src.get(path)
    cats["skipped"].append(Entry(path, None if src is None else src.shape,
                                 model_leaf.shape, "skip pattern"))
    return model_leaf
  if path not in flat_src:
    if rules.is_head(path) and not source_has_head:
      cats["reinitialised"].append(Entry(
          path, None, model_leaf.shape, "the checkpoint has no classifier head: new head"))
    else:
      cats["missing"].append(Entry(path, None, model_leaf.shape))
    return model_leaf
  src = flat_src[path]
  if src.shape != model_leaf.shape:
    fixed = _adapted(path, src, model_leaf.shape, rules.adapters, cats)
    if fixed is None:
      category, entry = _unfit(path, src, model_leaf, rules)
      cats[category].append(entry)
      return model_leaf
    src = fixed
  value = _cast(path, src, model_leaf, rules.dtype, cats)
  cats["loaded"].append(Entry(path, src.shape, model_leaf.shape))
  return value


def _adapted(path: str, src: np.ndarray, shape: Shape,
             adapters: Sequence[tuple[str, Adapter]], cats: dict[str, list[Entry]]
             ) -> np.ndarray | None:
  """`src` reshaped to `shape` by the first adapter that fits `path`, or None."""
  for pattern, fn in adapters:
    if re.fullmatch(pattern, path):
      fixed = fn(src, shape)
      if fixed is not None and tuple(fixed.shape) == shape:
        cats["adapted"].append(Entry(path, src.shape, shape, getattr(fn, "__name__", "adapter")))
        return fixed
  return None


def _unfit(path: str, src: np.ndarray, model_leaf: Any, rules: _Rules) -> tuple[str, Entry]:
  """(category, entry) of a leaf whose shape no adapter fixed: a new head or a mismatch."""
  if (rules.is_head(path) and src.ndim == model_leaf.ndim and src.ndim > 0
      and src.shape[:-1] == model_leaf.shape[:-1]):
    return "reinitialised", Entry(path, src.shape, model_leaf.shape,
                                  f"checkpoint has {src.shape[-1]} classes, model "
                                  f"{model_leaf.shape[-1]}: re-initialised")
  return "mismatched", Entry(path, src.shape, model_leaf.shape)


def _report_source_only(flat_src: Mapping[str, np.ndarray], flat_like: Mapping[str, Any],
                        rules: _Rules, cats: dict[str, list[Entry]]) -> None:
  """Reports the checkpoint leaves the model does not have."""
  for path, src in flat_src.items():
    if path in flat_like:
      continue
    if rules.skipped(path):
      cats["skipped"].append(Entry(path, src.shape, None, "skip pattern"))
    elif rules.is_head(path):
      cats["skipped"].append(Entry(path, src.shape, None, "model has no head"))
    else:
      cats["unexpected"].append(Entry(path, src.shape, None))


def _is_abstract(leaf: Any) -> bool:
  """A shape-and-dtype placeholder (jax.ShapeDtypeStruct), not an array."""
  return (hasattr(leaf, "shape") and hasattr(leaf, "dtype")
          and not isinstance(leaf, (np.ndarray, np.generic)) and not hasattr(leaf, "__array__"))


def _materialise(out: dict[str, Any], init: Callable[[Sequence[str]], Mapping[str, Any]] | None
                 ) -> None:
  """Replaces the abstract leaves left in `out` (not loaded) by `init`'s arrays."""
  abstract = [p for p, v in out.items() if _is_abstract(v)]
  if not abstract:
    return
  if init is None:
    raise LoadError(
        f"{len(abstract)} variables are abstract (shape/dtype only) and the checkpoint does "
        "not provide them:\n" + bullet_list(abstract, limit=30) + "\nPass init=fn(paths) -> "
        "{path: array} to load_pretrained, or concrete arrays in `like`.")
  made = dict(init(abstract))
  problems = []
  for path in abstract:
    want = out[path]
    got = made.get(path)
    if got is None or tuple(np.shape(got)) != tuple(want.shape):
      problems.append(f"{path}: init gave {None if got is None else np.shape(got)}, "
                      f"expected {tuple(want.shape)}")
      continue
    out[path] = np.asarray(got, want.dtype)
  if problems:
    raise LoadError("load_pretrained: init(paths) did not return the leaves asked "
                    "for:\n" + bullet_list(problems))


def _cast(path: str, src: np.ndarray, init: np.ndarray, dtype: Any,
          cats: dict[str, list[Entry]]) -> np.ndarray:
  is_float = np.issubdtype(src.dtype, np.floating) or src.dtype.name in (
      "bfloat16", "float8_e4m3fn", "float8_e5m2")
  target = np.dtype(dtype) if dtype is not None and is_float else init.dtype
  if src.dtype != target:
    cats["cast"].append(Entry(path, src.shape, init.shape,
                              f"{src.dtype} -> {target}"))
    return src.astype(target)
  return src


def _naming_hint(report: LoadReport) -> str | None:
  """Advice when the checkpoint holds the model's leaves under other names:
  another collection name (a converter renaming it), a prefix before them (a
  saved training state: subtree=) or "." separators."""
  missing = [e.path for e in report.missing]
  unexpected = [e.path for e in report.unexpected]
  if not missing or not unexpected:
    return None
  model_side = (report.loaded, report.missing, report.mismatched, report.reinitialised,
                report.skipped)
  renaming = _collection_hint(missing, unexpected, {
      e.path.split("/")[0] for entries in model_side for e in entries if e.model_shape})
  if renaming:
    return renaming
  prefixes: dict[str, int] = {}
  examples: dict[str, tuple[str, str]] = {}
  for name in unexpected:
    plain = name.replace(".", "/")
    for path in missing:
      tail = _strip_collection(path)
      if plain != name and plain.endswith(tail):
        return ("The checkpoint's names use '.' where the model's use '/' (e.g. "
                f"{name!r} for {path!r}): pass converter=lambda flat: {{k.replace('.', '/'): v "
                "for k, v in flat.items()}, or a converter for its layout.")
      # Without its collection only under "params/": what subtree= then loads
      # gets "params/" before it, never another collection's name.
      for suffix in (path, tail) if path.startswith("params/") else (path,):
        if name.endswith("/" + suffix):
          prefix = name[:-len(suffix) - 1]
          prefixes[prefix] = prefixes.get(prefix, 0) + 1
          examples.setdefault(prefix, (name, path))
          break
  if not prefixes:
    return None
  prefix = max(prefixes, key=prefixes.get)
  found = prefix.split("/", 1)[1] if prefix.startswith("params/") else prefix
  name, path = examples[prefix]
  return (f"The checkpoint holds the model's leaves under the prefix {found!r} (e.g. "
          f"{name!r} for {path!r}): pass subtree={found!r} to "
          "load_pretrained (or jtl.weights.read) to load from there. strict=False would only "
          "keep the init values.")


def _collection_hint(missing: Sequence[str], unexpected: Sequence[str],
                     collections: set[str]) -> str | None:
  """Advice when checkpoint names differ from the model's only in their first
  part, the collection (an NNX run's "state" for a Linen model's
  "batch_stats"): a converter renaming the most frequent one. A name the
  model has as a collection (`collections`) is no rename."""
  model_collections: dict[str, set[str]] = {}
  for path in missing:
    if "/" in path:
      collection, rest = path.split("/", 1)
      model_collections.setdefault(rest, set()).add(collection)
  pairs: dict[tuple[str, str], int] = {}
  examples: dict[tuple[str, str], tuple[str, str]] = {}
  for name in unexpected:
    collection, _, rest = name.partition("/")
    if collection in collections:
      continue
    for other in sorted(model_collections.get(rest, set()) - {collection}):
      pairs[collection, other] = pairs.get((collection, other), 0) + 1
      examples.setdefault((collection, other), (name, f"{other}/{rest}"))
  if not pairs:
    return None
  old, new = max(pairs, key=pairs.get)
  name, path = examples[old, new]
  return (f"The checkpoint holds the model's {new!r} leaves under {old!r} (e.g. {name!r} for "
          f"{path!r}): pass converter=lambda flat: {{({new + '/'!r} + k[len({old + '/'!r}):] "
          f"if k.startswith({old + '/'!r}) else k): v for k, v in flat.items()}} to "
          "load_pretrained to rename it. strict=False would only keep the init values.")


def strict_message(source: Any, report: LoadReport, advice: str | None = None) -> str:
  """A failed strict load's message: what is missing, unexpected and
  mismatched, then `advice` (default: how to fix or relax the load)."""
  where = "the given arrays" if isinstance(source, Mapping) else str(source)
  parts = [f"Checkpoint {where} does not fit the model:"]
  for name in ("missing", "unexpected", "mismatched"):
    entries = getattr(report, name)
    if entries:
      parts.append(f"{len(entries)} {name}:\n" + bullet_list(entries, limit=30))
  parts.append(advice or
      "Fix the converter, or relax: skip=[regex, ...] for leaves to leave at "
      "their init, reinit_head= for the classifier, or strict=False to keep "
      "init values for everything that does not fit (listed in the report).")
  return "\n".join(parts)
