"""Checkpoints on the Hugging Face Hub, fetched with `huggingface_hub`.

Two source forms, usable wherever jtl takes a checkpoint source (`read`,
`load_pretrained`, `models.create(pretrained=...)`, `scripts/convert.py
--source`, a config's `pretrained`):

- `hf://<owner>/<name>[@<revision>]/<file>`: one file of a model repo, e.g.
  `hf://timm/resnet50.a1_in1k/model.safetensors` or
  `hf://google-bert/bert-base-uncased@main/model.safetensors`;
- `hf-hub:<owner>/<name>[@<revision>]` (as timm writes it): the repo's weights,
  the first of `WEIGHT_FILES` it has; a sharded checkpoint
  (`model.safetensors.index.json`) brings all its shards.

A local folder in the Hub layout (`config.json` next to one of
`WEIGHT_FILES`: what `scripts/convert.py --format hf` writes, or
`huggingface-cli download --local-dir` leaves) stands for a repo wherever
`hf-hub:` does, named by its path or as `hf-hub:<path>` (`local_repo`); as
in transformers' `from_pretrained`, an existing folder wins over a Hub repo
of the same name.

Files come through `huggingface_hub.hf_hub_download`, so its cache and
environment apply, read when the download is made (not when jtl is
imported): `HF_HOME` / `HF_HUB_CACHE`, `HF_ENDPOINT`, `HF_HUB_OFFLINE`,
`HF_TOKEN` and the stored login. A revision is a branch, tag or commit hash;
one with a slash (`refs/pr/1`) is written URL-encoded (`refs%2Fpr%2F1`).
Every failure (no such repo, revision or file, a gated repo, offline without
a cached copy, no network) is a `CheckpointError` naming the repo, revision
and file, and what to do.

>>> parse("hf://timm/vit_base_patch16_224.augreg2_in21k_ft_in1k@main/model.safetensors")
HubRef(repo_id='timm/vit_base_patch16_224.augreg2_in21k_ft_in1k', revision='main', filename='model.safetensors')
>>> str(parse("hf-hub:timm/resnet18.a1_in1k"))
'hf-hub:timm/resnet18.a1_in1k'
>>> parse("/tmp/x.npz") is None
True
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import urllib.parse
from typing import Any

from etils import epath

from jtl import _optional
from jtl.errors import CheckpointError

HF_PREFIX = "hf://"
HUB_PREFIX = "hf-hub:"
# Weight files of a whole repo, in the order they are looked for.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")
_FEATURE = "hf:// and hf-hub: sources (the Hugging Face Hub)"
_LOG = logging.getLogger(__name__)
_REPO = r"[\w.-]+/[\w.-]+"
_HF_RE = re.compile(rf"hf://({_REPO})(?:@([^/]+))?/(.+)")
_HUB_RE = re.compile(rf"hf-hub:({_REPO})(?:@([^/]+))?/?")


@dataclasses.dataclass(frozen=True)
class HubRef:
  """A repo on the Hub, a revision (None: the default branch) and a file."""
  repo_id: str
  revision: str | None = None
  filename: str | None = None  # None: the whole repo (hf-hub:)

  def __str__(self) -> str:
    rev = f"@{urllib.parse.quote(self.revision, safe='')}" if self.revision else ""
    if self.filename is None:
      return f"{HUB_PREFIX}{self.repo_id}{rev}"
    return f"{HF_PREFIX}{self.repo_id}{rev}/{self.filename}"


def local_repo(source: Any) -> epath.Path | None:
  """The local folder in the Hub layout that `source` names (a path, or
  "hf-hub:<path>", holding a config.json), or None.

  >>> local_repo("hf-hub:timm/surely-not-a-local-folder") is None
  True
  """
  if isinstance(source, os.PathLike):
    source = os.fspath(source)
  if not isinstance(source, str) or source.startswith(HF_PREFIX):
    return None
  text = source[len(HUB_PREFIX):] if source.startswith(HUB_PREFIX) else source
  if not text or "\0" in text:
    return None
  try:
    path = epath.Path(os.path.expanduser(text))
    return path if (path / "config.json").is_file() else None
  except (OSError, ValueError):
    return None


def local_weights(folder: epath.Path) -> epath.Path:
  """The weights of a local Hub-layout folder: the first of `WEIGHT_FILES`.

  Raises:
    CheckpointError: it has none of them, or a shard its index names is missing.
  """
  for filename in WEIGHT_FILES:
    path = folder / filename
    if path.is_file():
      if filename.endswith(".index.json"):
        absent = [s for s in shard_names(path) if not (folder / s).is_file()]
        if absent:
          raise CheckpointError(f"{path}: the shards {absent[:5]} it names are not in "
                                f"{folder}.")
      return path
  raise CheckpointError(
      f"{folder} has a config.json but none of the weight files {list(WEIGHT_FILES)}; "
      "a Hub-layout folder holds both (convert.py --format hf writes them).")


def is_hub(source: Any) -> bool:
  """True for strings starting with "hf://" or "hf-hub:"."""
  return isinstance(source, str) and source.startswith((HF_PREFIX, HUB_PREFIX))


def parse(source: Any) -> HubRef | None:
  """The `HubRef` of an "hf://" or "hf-hub:" string; None for anything else.

  Raises:
    CheckpointError: the string starts with a Hub prefix but is malformed.
  """
  if not is_hub(source):
    return None
  m = (_HF_RE if source.startswith(HF_PREFIX) else _HUB_RE).fullmatch(source)
  if m is None:
    raise CheckpointError(
        f"{source!r} is not a Hub source. Expected "
        "'hf://<owner>/<name>[@<revision>]/<file>' (one file) or "
        "'hf-hub:<owner>/<name>[@<revision>]' (the repo's weights), e.g. "
        "'hf://timm/resnet18.a1_in1k/model.safetensors'.")
  rev = urllib.parse.unquote(m.group(2)) if m.group(2) else None
  filename = m.group(3) if source.startswith(HF_PREFIX) else None
  if filename is not None and (filename.startswith("/") or ".." in filename.split("/")):
    raise CheckpointError(f"{source!r}: the file name {filename!r} must be a "
                          "relative path inside the repo.")
  return HubRef(m.group(1), rev, filename)


def _env_true(name: str) -> bool:
  return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_settings() -> dict[str, Any]:
  """endpoint, cache_dir and offline as `huggingface_hub` would read them now.

  `huggingface_hub` reads its environment once, at import; jtl reads it at
  each download, so that a variable set later (a notebook, a test) applies.
  """
  constants = _optional.require("huggingface_hub.constants", _FEATURE)
  cache = os.environ.get("HF_HUB_CACHE") or (
      os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME")
      else constants.HF_HUB_CACHE)
  endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
  offline = _env_true("HF_HUB_OFFLINE") or (
      "HF_HUB_OFFLINE" not in os.environ and bool(constants.HF_HUB_OFFLINE))
  return {"endpoint": endpoint, "cache_dir": cache, "offline": offline}


def _describe(repo_id: str, revision: str | None, filename: str) -> str:
  return (f"file {filename!r} of the Hub repo {repo_id!r} at revision "
          f"{revision or 'main'!r}")


class _Missing(CheckpointError):
  """The repo (or the cache, offline) has no such file: try the next name."""


def download(repo_id: str, filename: str, revision: str | None = None
             ) -> epath.Path:
  """Downloads one file of a model repo (or finds it in the cache).

  Raises:
    CheckpointError: with what went wrong and what to do.
  """
  hf_hub_download = _optional.require("huggingface_hub", _FEATURE).hf_hub_download
  s = hub_settings()
  try:
    path = hf_hub_download(repo_id, filename, revision=revision,
                           cache_dir=s["cache_dir"], endpoint=s["endpoint"],
                           local_files_only=s["offline"])
  except Exception as e:  # every client failure becomes one message
    raise _hub_error(e, repo_id, revision, filename, s) from e
  return epath.Path(path)


def _hub_error(e: Exception, repo_id: str, revision: str | None, filename: str,
               s: dict[str, Any]) -> CheckpointError:
  errors = _optional.require("huggingface_hub.errors", _FEATURE)
  what = _describe(repo_id, revision, filename)
  page = f"{s['endpoint']}/{repo_id}"
  status = getattr(getattr(e, "response", None), "status_code", None)
  if isinstance(e, errors.GatedRepoError) or (
      status in (401, 403) and not isinstance(e, errors.RepositoryNotFoundError)):
    return CheckpointError(
        f"Cannot download {what}: the repo is gated or private (HTTP "
        f"{status}). Accept its terms on {page} with your account, then log "
        "in (`hf auth login`) or set HF_TOKEN to a token with read access.")
  if isinstance(e, errors.RepositoryNotFoundError):
    return CheckpointError(
        f"Cannot download {what}: there is no repo {repo_id!r} at "
        f"{s['endpoint']} (HTTP {status}), or it is private. Check the name "
        "(<owner>/<name>, as on its Hub page); for a private repo, log in or "
        "set HF_TOKEN.")
  if isinstance(e, errors.RevisionNotFoundError):
    return CheckpointError(
        f"Cannot download {what}: the repo has no revision {revision!r}. "
        "Pass an existing branch, tag or commit hash after '@' (or none, "
        f"for the default branch); see {page}/tree/main.")
  if isinstance(e, errors.LocalEntryNotFoundError):
    if s["offline"]:
      return _Missing(
          f"Cannot load {what}: HF_HUB_OFFLINE is set and the file is not in "
          f"the Hub cache {s['cache_dir']}. Download it once with the network "
          "(unset HF_HUB_OFFLINE), or point HF_HOME / HF_HUB_CACHE at a cache "
          "that has it.")
    cause = getattr(getattr(e.__cause__, "response", None), "status_code", None)
    if isinstance(cause, int) and cause >= 500:
      return CheckpointError(
          f"Cannot download {what}: {s['endpoint']} answered HTTP {cause} (a "
          f"server error) and the file is not in the Hub cache {s['cache_dir']}. "
          "The Hub may be down or overloaded: retry later.")
    return CheckpointError(
        f"Cannot download {what}: {s['endpoint']} cannot be reached "
        f"({type(e.__cause__ or e).__name__}) and the file is not in the Hub "
        f"cache {s['cache_dir']}. Check the network and HF_ENDPOINT, or set "
        "HF_HUB_OFFLINE=1 with a cache that has the file.")
  if isinstance(e, errors.EntryNotFoundError):
    return _Missing(
        f"Cannot download {what}: the repo has no such file at that "
        f"revision. See the file list on {page}/tree/{revision or 'main'}.")
  return CheckpointError(f"Cannot download {what}: {type(e).__name__}: "
                         f"{str(e)[:300]}")


def repo_weights(repo_id: str, revision: str | None = None) -> epath.Path:
  """The local path of a repo's weights: the first of `WEIGHT_FILES` it has.

  For a sharded checkpoint this is the index file, and every shard it names
  is downloaded next to it (`jtl.weights.read` reads the index as one checkpoint).

  Raises:
    CheckpointError: the repo has none of `WEIGHT_FILES`, or a download fails.
  """
  offline_miss = None
  for filename in WEIGHT_FILES:
    try:
      path = download(repo_id, filename, revision)
    except _Missing as e:
      offline_miss = offline_miss or (e if "HF_HUB_OFFLINE" in str(e) else None)
      continue
    if filename.endswith(".index.json"):
      for shard in shard_names(path):
        download(repo_id, shard, revision)
    return path
  if offline_miss is not None:
    raise CheckpointError(str(offline_miss))
  raise CheckpointError(
      f"The Hub repo {repo_id!r} at revision {revision or 'main'!r} has none "
      f"of the weight files {list(WEIGHT_FILES)}. Name the file yourself: "
      f"'hf://{repo_id}/<file>'.")


def weight_map(index_path: Any) -> dict[str, str]:
  """The {tensor: shard file} map of a sharded checkpoint's `*.index.json`.

  Raises:
    CheckpointError: the index is not JSON with a non-empty "weight_map" of
      plain file names (in the index's folder).
  """
  try:
    index = json.loads(epath.Path(index_path).read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
    raise CheckpointError(f"{index_path}: not a readable JSON index ({e}).") from None
  found = index.get("weight_map") if isinstance(index, dict) else None
  if not isinstance(found, dict) or not found or not all(
      isinstance(v, str) and v and "/" not in v and "\\" not in v
      and v not in (".", "..") for v in found.values()):
    raise CheckpointError(
        f"{index_path}: a sharded-checkpoint index needs a non-empty "
        "'weight_map' of {tensor name: shard file name in the same folder}.")
  return found


def shard_names(index_path: Any) -> list[str]:
  """The shard files an `*.index.json` refers to, sorted."""
  return sorted(set(weight_map(index_path).values()))


def read_sharded(index_path: Any, read_fn: Any, **kwargs: Any) -> dict[str, Any]:
  """Reads every shard of a sharded checkpoint with `read_fn(path, **kwargs)`.

  Each shard must hold exactly the tensors the index maps to it.

  Raises:
    CheckpointError: a shard is missing or does not match the index.
  """
  index_path = epath.Path(index_path)
  wmap = weight_map(index_path)
  out: dict[str, Any] = {}
  for shard in sorted(set(wmap.values())):
    flat = read_fn(index_path.parent / shard, **kwargs)
    wrong = sorted(k for k in flat if wmap.get(k) != shard)
    absent = sorted(k for k, v in wmap.items() if v == shard and k not in flat)
    if wrong or absent:
      raise CheckpointError(
          f"{index_path}: shard {shard!r} does not match the index: it holds "
          f"{wrong[:5]} that the index puts elsewhere or nowhere, and lacks "
          f"{absent[:5]}. Download the checkpoint again.")
    out.update(flat)
  return out


def resolve(source: str) -> epath.Path:
  """The local path of an "hf://" file or an "hf-hub:" repo's (or local
  Hub-layout folder's) weights."""
  folder = local_repo(source)
  if folder is not None:
    return local_weights(folder)
  ref = parse(source)
  if ref.filename is None:
    return repo_weights(ref.repo_id, ref.revision)
  path = download(ref.repo_id, ref.filename, ref.revision)
  if ref.filename.endswith(".index.json"):
    for shard in shard_names(path):
      download(ref.repo_id, shard, ref.revision)
  return path


def read_config(source: str) -> dict[str, Any]:
  """The `config.json` of the repo an "hf://" or "hf-hub:" source names (or
  of a local Hub-layout folder)."""
  return read_json(source, "config.json")


def read_json(source: str, filename: str, *, optional: bool = False) -> dict[str, Any] | None:
  """The JSON object file `filename` of the repo an "hf://" or "hf-hub:"
  source names (or of a local Hub-layout folder). With `optional`, None when
  the repo has no such file (or, offline, the cache lacks it: logged).

  Raises:
    CheckpointError: the file is missing (not `optional`), cannot be
      downloaded or is not a JSON object.
  """
  folder = local_repo(source)
  if folder is not None:
    path, what = folder / filename, str(folder / filename)
    if optional and not path.is_file():
      return None
  else:
    ref = parse(source)
    try:
      path = download(ref.repo_id, filename, ref.revision)
    except _Missing as e:
      if not optional:
        raise
      if "HF_HUB_OFFLINE" in str(e):  # the repo may hold it: say what stands in
        _LOG.warning("%s Going on without it (the model family's defaults).", e)
      return None
    what = _describe(ref.repo_id, ref.revision, filename)
  try:
    config = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
    raise CheckpointError(f"{what} is not valid JSON ({e}).") from None
  if not isinstance(config, dict):
    raise CheckpointError(f"{what} is not a JSON object.")
  return config
