"""jtl.export.deploy: EfficientNet-Lite0 with its real ImageNet weights, exported to
ONNX and LiteRT (float32 and full-integer int8) and run in onnxruntime and the
LiteRT interpreter on scikit-image's chelsea (a cat) and coffee (espresso).

Tolerances: float32 files give jtl's logits within 1e-3 absolute (measured:
about 1e-5, the logits span about 30); the int8 file keeps the top-1 class.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
from jax import lax
from run_helpers import saved_run

from jtl import models
from jtl.app import deploy_runs, evaluation, workdirs
from jtl.batchnorm import recompute_batchnorm
from jtl.errors import CheckpointError, ConfigError, DataError
from jtl.models import efficientnet
from jtl.export import deploy

pytest.importorskip("onnxruntime")
pytest.importorskip("jax2onnx")

FLOAT_ATOL = 1e-3
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def _calibration_images(count: int = 32) -> list[np.ndarray]:
  """Random crops of photos other than the two test photos, preprocessed."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  photos = [skimage.data.astronaut(), skimage.data.rocket(), skimage.data.immunohistochemistry(),
            skimage.data.colorwheel(), skimage.data.logo()[..., :3], skimage.data.cat()[:, ::-1]]
  rng = np.random.default_rng(0)
  crops = []
  for i in range(count):
    img = photos[i % len(photos)]
    side = int(min(img.shape[:2]) * rng.uniform(0.5, 1.0))
    top = rng.integers(0, img.shape[0] - side + 1)
    left = rng.integers(0, img.shape[1] - side + 1)
    crop = Image.fromarray(np.ascontiguousarray(img[top:top + side, left:left + side]))
    crops.append(np.asarray(crop.resize((224, 224), Image.BILINEAR)))
  x = np.asarray(efficientnet.preprocess(np.stack(crops), size=None), np.float32)
  return [x[i:i + 1] for i in range(count)]


def _lite0():
  """models.create("efficientnet_lite0", pretrained=True)'s module and
  variables, without compiling `init` (8 s on 2 cores): the checkpoint is
  loaded into zeros of the init's shapes."""
  from jtl import weights  # pylint: disable=g-import-not-at-top
  module = efficientnet.efficientnet_lite0()
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))
  like = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  variables, report = weights.load_pretrained(
      weights.read(weights.resolve("efficientnet_lite0/imagenet")), like=like,
      converter=efficientnet.convert_torch)
  assert report.ok
  return module, variables


@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
  """The model, the two photos, jtl's logits and the three exported files."""
  module, variables = _lite0()
  photos = np.concatenate([efficientnet.preprocess(skimage.data.chelsea()),
                           efficientnet.preprocess(skimage.data.coffee())]).astype(np.float32)
  logits = np.asarray(jax.jit(deploy.inference_fn(module, variables))(photos))
  out = tmp_path_factory.mktemp("deploy")
  files = {}
  for fmt in deploy.FORMATS:
    files[fmt] = deploy.export(
        module, variables, out / f"lite0{deploy.SUFFIX[fmt]}", format=fmt,
        representative=_calibration_images() if fmt == "tflite_int8" else None,
        meta={"model": "efficientnet_lite0"})
  return {"photos": photos, "logits": logits, "files": files}


def test_jtl_reference_classifies_the_photos(lite0):
  top1 = lite0["logits"].argmax(1)
  assert top1[0] in CAT_CLASSES and top1[1] == ESPRESSO, top1


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_float_exports_give_jtl_logits(lite0, fmt):
  exported = lite0["files"][fmt]
  runtime = deploy.load(exported.path, num_threads=2)
  assert runtime.format == fmt and runtime.input_shape == (224, 224, 3)
  both = runtime(lite0["photos"])
  one = runtime(lite0["photos"][1:])  # another batch size, same file
  np.testing.assert_allclose(both, lite0["logits"], atol=FLOAT_ATOL, rtol=0)
  np.testing.assert_allclose(one, lite0["logits"][1:], atol=FLOAT_ATOL, rtol=0)
  np.testing.assert_array_equal(both.argmax(1), lite0["logits"].argmax(1))
  # The weights are in the file: 4.65M float32 parameters, about 18.6 MB.
  assert 18.0e6 < exported.bytes < 19.5e6, exported.bytes
  assert deploy.read_meta(exported.path)["format"] == fmt


def test_onnx_batch_dimension_is_dynamic(lite0):
  import onnx  # pylint: disable=g-import-not-at-top
  model = onnx.load(lite0["files"]["onnx"].path, load_external_data=False)
  dims = model.graph.input[0].type.tensor_type.shape.dim
  assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [224, 224, 3]


def test_int8_tflite_keeps_top1_with_int8_kernels(lite0):
  exported = lite0["files"]["tflite_int8"]
  runtime = deploy.load(exported.path, num_threads=2)
  logits = runtime(lite0["photos"])
  np.testing.assert_array_equal(logits.argmax(1), lite0["logits"].argmax(1))
  # Full-integer: every conv and matmul reads int8 tensors, none float32.
  types = deploy.tflite_tensor_types(exported.path)
  for op in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
    assert "int8" in types[op] and "float32" not in types[op], (op, types[op])
  assert exported.bytes < 0.3 * lite0["files"]["tflite"].bytes, exported.bytes
  check = deploy.check_int8(lambda x: lite0["logits"], runtime, lite0["photos"])
  assert check["top1_agreement"] == 100.0 and check["drop_points"] == 0.0


class _Odd(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x + lax.population_count(x.astype(jnp.int32)).astype(jnp.float32)


class _Callback(nn.Module):
  @nn.compact
  def __call__(self, x):
    return jax.pure_callback(lambda v: np.asarray(v) * 2, jax.ShapeDtypeStruct(x.shape, x.dtype), x)


class _Net(nn.Module):
  odd: type

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Dense(4, name="body")(x)
    x = self.odd(name="strange_layer")(x)
    return nn.Dense(3, name="head")(x)


@pytest.mark.parametrize("fmt,layer,op", [("tflite", _Odd, "population_count"),
                                          ("onnx", _Callback, "pure_callback")])
def test_unsupported_op_names_layer_and_op(tmp_path, fmt, layer, op):
  module = _Net(layer)
  variables = module.init(jax.random.PRNGKey(0), np.zeros((1, 8), np.float32))
  with pytest.raises(deploy.ExportError) as info:
    deploy.export(module, variables, tmp_path / f"m{deploy.SUFFIX[fmt]}", format=fmt,
                  input_shape=(8,))
  message = str(info.value)
  assert "layer strange_layer" in message and f"op {op}" in message, message
  assert not (tmp_path / f"m{deploy.SUFFIX[fmt]}").exists()


def test_int8_accuracy_drop_warns_with_both_numbers():
  x = np.eye(4, dtype=np.float32)
  labels = np.arange(4)
  half_wrong = lambda v: np.where(np.arange(4) < 2, v.T, v[:, ::-1].T).T
  with pytest.warns(deploy.QuantizationWarning,
                    match=r"float32 accuracy 100\.00%, int8 50\.00% \(threshold 1\.00"):
    result = deploy.check_int8(lambda v: v, half_wrong, x, labels)
  assert result["drop_points"] == 50.0
  with pytest.warns(deploy.QuantizationWarning, match=r"agreement with float32 100\.00%, int8 0\.00%"):
    deploy.check_int8(lambda v: v, lambda v: v[:, ::-1], x)


def test_bad_requests_are_clear_errors(tmp_path):
  module = nn.Dense(2)
  variables = module.init(jax.random.PRNGKey(0), np.zeros((1, 3), np.float32))
  with pytest.raises(ConfigError, match="expected one of"):
    deploy.export(module, variables, tmp_path / "m.x", format="coreml", input_shape=(3,))
  with pytest.raises(ConfigError, match="representative images"):
    deploy.export(module, variables, tmp_path / "m.tflite", format="tflite_int8",
                  input_shape=(3,))
  with pytest.raises(CheckpointError, match="no such file"):
    deploy.load(tmp_path / "missing.onnx")
  (tmp_path / "junk.tflite").write_bytes(b"not a flatbuffer")
  with pytest.raises(CheckpointError, match="cannot load"):
    deploy.load(tmp_path / "junk.tflite")


def test_import_jtl_deploy_loads_no_converter():
  import subprocess  # pylint: disable=g-import-not-at-top
  code = ("import sys, jtl.export.deploy; bad = [m for m in ('tensorflow', 'onnx', 'onnxruntime', "
          "'jax2onnx', 'ai_edge_litert') if m in sys.modules]; print(bad)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
  assert out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]


def _tiny_workdir(root, image_size=28, variables=None, **config_updates):
  """A workdir as scripts/finetune.py leaves it (config in the checkpoint's
  meta), holding `variables` (default: a freshly initialised small_cnn);
  data: a folder of crops of two real photos."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  import configs.default  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  photos = {"cat": skimage.data.chelsea(), "cup": skimage.data.coffee()}
  for split, count in (("train", 16), ("test", 6)):
    for name, img in photos.items():
      (root / "photos" / split / name).mkdir(parents=True)
      for i in range(count):
        top, left = rng.integers(0, 150), rng.integers(0, 150)
        Image.fromarray(img[top:top + 120, left:left + 120]).save(
            root / "photos" / split / name / f"{i}.png")
  config = configs.default.get_config()
  config.update(dict(model="small_cnn", pretrained=False, dataset=f"folder:{root / 'photos'}",
                     image_size=image_size, batch_size=8, eval_batch_size=8, train_split="train",
                     eval_split="test"))
  for key, value in config_updates.items():  # whole keys (method={...}), not merged
    config[key] = value
  if variables is None:
    variables = models.create("small_cnn", num_classes=2, pretrained=False, seed=3).variables
  return saved_run(root / "run", config, variables)


def test_workdir_export_and_evaluation_in_the_runtime(tmp_path):
  workdir = _tiny_workdir(tmp_path)
  exported = deploy_runs.export_workdir(workdir, "tflite_int8", num_calibration=16)
  assert exported.path == str(workdir / "export" / "model.int8.tflite")
  check = deploy.read_meta(exported.path)["calibration_check"]
  assert check["count"] == 16 and 0.0 <= check["int8_accuracy"] <= 100.0
  result = deploy_runs.evaluate_exported(workdir, exported.path)
  assert result["count"] == 12 and result["format"] == "tflite_int8"
  assert sum(map(sum, result["confusion_matrix"])) == 12
  assert result["results_file"] == str(workdir / "eval_test_step1_tflite_int8.json")
  # The float file in the same runtime agrees with jtl's own evaluation.
  onnx_file = deploy_runs.export_workdir(workdir, "onnx", input_pixels=True).path
  reference = evaluation.evaluate_workdir(workdir, step="best")
  onnx_result = deploy_runs.evaluate_exported(workdir, onnx_file)
  assert onnx_result["accuracy"] == reference["accuracy"]
  assert abs(onnx_result["loss"] - reference["loss"]) < 1e-4


def test_exported_files_are_evaluated_as_the_step_they_hold(tmp_path):
  """Audit: evaluate.py --exported recorded the workdir's best step, not the
  file's, and named the result by the format alone: step1.onnx's result was
  overwritten by step2.onnx's; a sidecar of another model was never compared."""
  workdir = _tiny_workdir(tmp_path)  # step 1
  other = models.create("small_cnn", num_classes=2, pretrained=False, seed=5).variables
  saved_run(workdir, workdirs.restore(workdir).config, other, step=2, accuracy=0.9)  # best
  files = [deploy_runs.export_workdir(workdir, "onnx", step=s, out=tmp_path / f"step{s}.onnx")
           for s in (1, 2)]
  results = [deploy_runs.evaluate_exported(workdir, f.path, step="best") for f in files]
  assert [r["step"] for r in results] == [1, 2]
  assert results[0]["loss"] != results[1]["loss"]
  for s, result in zip((1, 2), results):
    assert result["results_file"] == str(workdir / f"eval_test_step{s}_onnx.json")
    saved = json.loads((workdir / f"eval_test_step{s}_onnx.json").read_text())
    assert (saved["step"], saved["loss"], saved["exported"]) == (s, result["loss"],
                                                                 files[s - 1].path)
  # The run's data moved: evaluate.py --exported ignored --dataset.
  (tmp_path / "photos").rename(tmp_path / "moved")
  moved = deploy_runs.evaluate_exported(workdir, files[0].path,
                                        data={"dataset": f"folder:{tmp_path / 'moved'}"})
  assert moved["loss"] == results[0]["loss"]
  assert moved["results_file"] == str(workdir / "eval_test_on_moved_step1_onnx.json")
  before = sorted(p.name for p in workdir.iterdir())
  for edit, named in (({"num_classes": 3}, "'small_cnn' with 3 classes"),
                      ({"model": "resnet18"}, "'resnet18' with 2 classes")):
    deploy.write_meta(files[0].path, {**files[0].meta, **edit})
    with pytest.raises(ConfigError, match=f"exported from the workdir .* from model {named}"):
      deploy_runs.evaluate_exported(workdir, files[0].path)
  assert sorted(p.name for p in workdir.iterdir()) == before


def test_a_file_name_of_another_format_is_refused_before_any_work(tmp_path):
  """Audit: format="onnx" with out=m.tflite wrote ONNX bytes that LiteRT
  refused (and LiteRT under m.onnx); now the suffix is checked as
  jtl.export.write checks it, before the workdir is even read."""
  assert [deploy.output_format(n) for n in ("m.onnx", "m.tflite", "m.int8.tflite")] == [
      "onnx", "tflite", "tflite_int8"]
  assert deploy.output_format("m.tflite", "tflite_int8") == "tflite_int8"  # a flatbuffer too
  for fmt, name, right in (("onnx", "m.tflite", "m.onnx"), ("tflite", "m.onnx", "m.tflite"),
                           ("tflite_int8", "m.onnx", "m.int8.tflite"),
                           ("tflite", "m.int8.tflite", "m.tflite")):
    with pytest.raises(CheckpointError, match=rf"is the \w+ format's, but format={fmt} was "
                                              rf"asked for(.|\n)*Name the file {right}"):
      deploy_runs.export_workdir(tmp_path / "no_run", fmt, out=tmp_path / name)
  module = nn.Dense(3)
  variables = module.init(jax.random.PRNGKey(0), np.zeros((1, 4), np.float32))
  with pytest.raises(CheckpointError, match="the suffix '.onnx' is the onnx format's"):
    deploy.export(module, variables, tmp_path / "d.onnx", format="tflite", input_shape=(4,),
                  train_kwarg=None)
  with pytest.raises(CheckpointError, match="cannot tell the export format from the suffix"):
    deploy.output_format(tmp_path / "m.bin")
  assert os.listdir(tmp_path) == []


def _dann_workdir(root):
  """A DANN run with method.batchnorm='separate' (a small_cnn whose running
  statistics are the source domain's: shifted by 3 from the target's)."""
  created = models.create("small_cnn", num_classes=2, pretrained=False, seed=3)
  v = jax.tree.map(np.asarray, created.variables)
  domain_head = {"Dense_0": {"kernel": np.zeros((128, 1), np.float32),
                             "bias": np.zeros((1,), np.float32)}}
  wrapped = {"params": {"model": v["params"], "domain": domain_head},
             "batch_stats": {"model": jax.tree.map(lambda a: a + 3.0, v["batch_stats"])}}
  return _tiny_workdir(root, variables=wrapped, method={
      "name": "dann", "target_dataset": f"folder:{root / 'photos'}", "batchnorm": "separate"})


def test_a_separate_batchnorm_dann_run_ships_the_model_evaluate_scores(tmp_path):
  """Audit: evaluate.py scores such a run after AdaBN (target statistics) but
  convert.py --workdir and workdirs.load gave the source statistics (ONNX
  logits 11.86 away, loss 0.693 for the evaluated 0.657)."""
  workdir = _dann_workdir(tmp_path)
  evaluated = evaluation.evaluate_workdir(workdir, split="test")
  assert evaluated["adabn"]["why"] == "method.batchnorm='separate'"
  exported = deploy_runs.export_workdir(workdir, "onnx", out=tmp_path / "m.onnx")
  assert deploy.read_meta(exported.path)["adabn"] == evaluated["adabn"]
  in_runtime = deploy_runs.evaluate_exported(workdir, exported.path, split="test")
  assert abs(in_runtime["loss"] - evaluated["loss"]) < 1e-4
  assert in_runtime["accuracy"] == evaluated["accuracy"]
  x = np.random.default_rng(0).standard_normal((4, 28, 28, 3)).astype(np.float32)
  loaded = np.asarray(workdirs.load(workdir).model(x))
  np.testing.assert_allclose(deploy.load(exported.path)(x), loaded, atol=1e-4)
  run = workdirs.restore(workdir)
  source = np.asarray(run.module.apply(run.merged_variables(), x, train=False))
  assert np.abs(loaded - source).max() > 1.0  # the statistics did change
  # Review: moved data could not be named to load() or the exports, and each
  # model() call ran its own AdaBN pass.
  moved = tmp_path / "moved"
  (tmp_path / "photos").rename(moved)
  with pytest.raises(DataError, match=r"data=\{'dataset': 'folder:/new/path'\} for "
                     "workdirs.load"):
    workdirs.load(workdir)
  run = workdirs.restore(workdir, data={"dataset": f"folder:{moved}"})
  passes = []
  with mock.patch.object(workdirs, "recompute_batchnorm",
                         side_effect=lambda *a: passes.append(1) or recompute_batchnorm(*a)):
    first, again = np.asarray(run.model()(x)), np.asarray(run.model("apply")(x))
  assert len(passes) == 1
  # A run made from it with other variables (benchmark_recsys) has no AdaBN result yet.
  fresh = dataclasses.replace(run, variables=run.variables)
  assert fresh._deployable == {}  # pylint: disable=protected-access
  np.testing.assert_allclose(first, loaded, atol=1e-5)
  np.testing.assert_allclose(again, loaded, atol=1e-5)
  moved_export = deploy_runs.export_workdir(workdir, "onnx", out=tmp_path / "m2.onnx",
                                            data={"dataset": f"folder:{moved}"})
  np.testing.assert_allclose(deploy.load(moved_export.path)(x), loaded, atol=1e-4)


def test_onnx_sidecar_describes_the_file(tmp_path):
  """Issue 27, bug 8: the sidecar named the input "x" while the graph's was
  "in_0", and gave the model's native image_size (28) for a file at another."""
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top

  workdir = _tiny_workdir(tmp_path, image_size=20)
  exported = deploy_runs.export_workdir(workdir, "onnx")
  meta = deploy.read_meta(exported.path)
  session = ort.InferenceSession(exported.path, providers=["CPUExecutionProvider"])
  assert [i.name for i in session.get_inputs()] == meta["inputs"] == ["x"]
  assert meta["input_shape"] == [None, 20, 20, 3] and meta["normalize"]["image_size"] == 20
  x = np.random.default_rng(0).standard_normal((3, 20, 20, 3)).astype(np.float32)
  (got,) = session.run(None, dict(zip(meta["inputs"], [x])))
  run = workdirs.restore(workdir, step="best")
  want = run.module.apply(run.merged_variables(), x, train=False)
  np.testing.assert_allclose(got, want, atol=1e-5)


class _Tokens(nn.Module):
  """Folds the batch into a reshape, as ViT's tokens do."""
  @nn.compact
  def __call__(self, x, train=False):
    tokens = nn.Dense(4)(x.reshape(x.shape[0] * 2, 4))
    return tokens.reshape(x.shape[0], 8)


def test_litert_graph_with_batch_in_a_reshape_runs_any_batch(tmp_path):
  module = _Tokens()
  variables = module.init(jax.random.PRNGKey(0), np.zeros((1, 8), np.float32))
  deploy.export(module, variables, tmp_path / "t.tflite", format="tflite", input_shape=(8,))
  x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
  runtime = deploy.load(tmp_path / "t.tflite")
  np.testing.assert_allclose(runtime(x), module.apply(variables, x), atol=1e-5)
  np.testing.assert_allclose(runtime(x[:1]), module.apply(variables, x[:1]), atol=1e-5)


class _VggPool(nn.Module):
  """VGG's head end: the adaptive 7x7 average pool, flattened, then a Dense."""
  @nn.compact
  def __call__(self, x, train=False):
    from jtl.models import vgg  # pylint: disable=g-import-not-at-top
    return nn.Dense(3)(vgg.adaptive_avg_pool(x, 7).reshape(x.shape[0], -1))


@pytest.mark.parametrize("size", [1, 3])
def test_vgg_adaptive_pool_runs_in_litert(tmp_path, size):
  # VGG at 32 px has a 1x1 map before the pool: its einsum with the pooling
  # matrices became a SUM + TRANSPOSE that LiteRT failed to prepare (the
  # support matrix's vgg x tflite / tflite_int8 cells).
  module = _VggPool()
  x = np.random.default_rng(0).standard_normal((2, size, size, 4)).astype(np.float32)
  variables = module.init(jax.random.PRNGKey(0), x[:1])
  path = tmp_path / "pool.tflite"
  deploy.export(module, variables, path, format="tflite", input_shape=(size, size, 4))
  np.testing.assert_allclose(deploy.load(path)(x), module.apply(variables, x), atol=1e-5)
