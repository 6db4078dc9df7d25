"""Property test: damaged checkpoints give arrays or a JtlError, nothing else.

Valid files of every format are mutated (truncated, bytes flipped, inserted,
deleted, or overwritten with huge length fields). `read` must then return a
dict of numpy arrays or raise a JtlError: no other exception, no hang (each
example runs under an alarm). Zip-based formats are also mutated *inside*
their members and re-zipped, so the parsers behind the CRC checks get fuzzed.
Counts per format are printed (run with -s to see them). A slice of the
structure-aware campaign of scripts/benchmarks/fuzz_readers.py runs here too.
"""

from __future__ import annotations

import io
import pathlib
import shutil
import signal
import tempfile
import zipfile

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jtl.export import write
from jtl.weights import read
from jtl.errors import JtlError

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures"
EXAMPLES = 200
ORBAX_EXAMPLES = 40
COUNTS: dict[str, dict[str, int]] = {}

_mutation = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.floats(0, 1), st.integers(1, 64)),
    st.tuples(st.just("huge"), st.floats(0, 1), st.sampled_from(
        [b"\xff" * 8, b"\x7f" + b"\xff" * 7, b"\x00\x00\x00\x80", b"\xff\xff\xff\x7f"])),
)
_mutations = st.lists(_mutation, min_size=1, max_size=4)


def mutate(data: bytes, mutations) -> bytes:
  data = bytearray(data)
  for kind, where, *arg in mutations:
    pos = min(int(where * len(data)), max(len(data) - 1, 0))
    if kind == "truncate":
      del data[pos:]
    elif kind == "flip" and data:
      data[pos] ^= arg[0]
    elif kind == "insert":
      data[pos:pos] = arg[0]
    elif kind == "delete":
      del data[pos:pos + arg[0]]
    elif kind == "huge":
      data[pos:pos + len(arg[0])] = arg[0]
  return bytes(data)


def _rezip(data: bytes, member_suffix: str, mutations) -> bytes:
  out = io.BytesIO()
  with zipfile.ZipFile(io.BytesIO(data)) as zin, zipfile.ZipFile(out, "w") as zout:
    for info in zin.infolist():
      payload = zin.read(info)
      if info.filename.endswith(member_suffix):
        payload = mutate(payload, mutations)
      zout.writestr(info.filename, payload)
  return out.getvalue()


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory) -> dict[str, pathlib.Path]:
  root = tmp_path_factory.mktemp("valid")
  rng = np.random.default_rng(0)
  tree = {"params": {"conv": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32)},
                     "head": {"bias": np.arange(5, dtype=np.int64),
                              "w": np.ones((4, 5), ml_dtypes.bfloat16)}},
          "batch_stats": {"bn": {"mean": np.zeros(4, np.float16)}}}
  files = {"torch_zip": FIXTURES / "torch_zip.pt",
           "torch_legacy": FIXTURES / "torch_legacy.pt"}
  for fmt in ("npz", "safetensors", "msgpack"):
    files[fmt] = root / f"model.{fmt}"
    write(tree, files[fmt])
  import orbax.checkpoint as ocp
  ocp.PyTreeCheckpointer().save(root / "orbax", tree)
  files["orbax"] = root / "orbax"
  return files


_FORMAT = {"torch_zip": "torch", "torch_zip_pickle": "torch",
           "torch_legacy": "torch", "npz": "npz", "npz_member": "npz",
           "safetensors": "safetensors", "msgpack": "msgpack"}


def _timeout(signum, frame):
  raise TimeoutError("read() took more than 20 s on a mutated file")


def _check(path, fmt, counts):
  old = signal.signal(signal.SIGALRM, _timeout)
  signal.alarm(20)
  try:
    for forced in (None, fmt):
      try:
        flat = read(path, format=forced)
      except JtlError:
        counts["error"] += 1
      else:
        counts["ok"] += 1
        assert isinstance(flat, dict)
        for key, value in flat.items():
          assert isinstance(key, str) and isinstance(value, np.ndarray), key
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("variant", sorted(_FORMAT))
def test_mutated_files(variant, valid_files, tmp_path):
  source = valid_files[variant.replace("_pickle", "").replace("_member", "")]
  data = source.read_bytes()
  counts = COUNTS.setdefault(variant, {"ok": 0, "error": 0})

  @settings(max_examples=EXAMPLES, deadline=None, database=None,
            derandomize=True, suppress_health_check=list(HealthCheck))
  @given(mutations=_mutations)
  def run(mutations):
    if variant == "torch_zip_pickle":
      mutated = _rezip(data, "/data.pkl", mutations)
    elif variant == "npz_member":
      mutated = _rezip(data, ".npy", mutations)
    else:
      mutated = mutate(data, mutations)
    path = tmp_path / f"fuzz.{variant}"
    path.write_bytes(mutated)
    _check(path, _FORMAT[variant], counts)

  run()
  print(f"\nfuzz {variant}: {sum(counts.values())} reads of {EXAMPLES} mutated "
        f"files: {counts['ok']} returned arrays, {counts['error']} raised JtlError")
  assert sum(counts.values()) == 2 * EXAMPLES
  assert counts["error"] > 0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_mutated_orbax_directories(valid_files, tmp_path):
  source = valid_files["orbax"]
  members = sorted(p.relative_to(source) for p in source.rglob("*") if p.is_file())
  counts = COUNTS.setdefault("orbax", {"ok": 0, "error": 0})

  @settings(max_examples=ORBAX_EXAMPLES, deadline=None, database=None,
            derandomize=True, suppress_health_check=list(HealthCheck))
  @given(which=st.integers(0, len(members) - 1), mutations=_mutations)
  def run(which, mutations):
    work = pathlib.Path(tempfile.mkdtemp(dir=tmp_path))
    shutil.copytree(source, work / "ckpt")
    target = work / "ckpt" / members[which]
    target.write_bytes(mutate(target.read_bytes(), mutations))
    _check(work / "ckpt", "orbax", counts)
    shutil.rmtree(work)

  run()
  print(f"\nfuzz orbax: {sum(counts.values())} reads of {ORBAX_EXAMPLES} mutated "
        f"checkpoints ({len(members)} files each): {counts['ok']} returned "
        f"arrays, {counts['error']} raised JtlError")
  assert sum(counts.values()) == 2 * ORBAX_EXAMPLES
  assert counts["error"] > 0


STRUCTURED_EXAMPLES = 30


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_structure_aware_mutations(tmp_path, monkeypatch):
  """A small slice of scripts/benchmarks/fuzz_readers.py's campaign, in-process: pickle
  opcodes, zip header fields, safetensors/npy/msgpack/zarr metadata, and the
  folder targets (PEFT adapters, Hub config.json files)."""
  from jtl.weights import hub
  monkeypatch.setattr(hub, "download", hub.download)  # the hub_config target serves files
  monkeypatch.syspath_prepend(str(pathlib.Path(__file__).parents[2] / "scripts" / "benchmarks"))
  import fuzz_readers
  monkeypatch.setattr(fuzz_readers, "BOMB_MIB", [1, 4])  # 300 MiB: slow here
  seeds = tmp_path / "seeds"
  fuzz_readers.make_seeds(str(seeds))
  counts: dict[str, int] = {}
  old = signal.signal(signal.SIGALRM, _timeout)
  try:
    for fmt in fuzz_readers.ALL_FORMATS:
      for index in range(STRUCTURED_EXAMPLES):
        path = fuzz_readers.make_case(fmt, index, 0, str(seeds), str(tmp_path))
        signal.alarm(20)
        outcome, detail = fuzz_readers.read_case(fmt, path)
        signal.alarm(0)
        assert outcome in ("arrays", "jtl_error"), (fmt, index, detail)
        counts[outcome] = counts.get(outcome, 0) + 1
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)
  print(f"\nstructured fuzz: {counts}")
  assert counts["jtl_error"] > counts.get("arrays", 0) > 0
