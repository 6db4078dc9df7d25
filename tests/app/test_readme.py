"""The README's Python examples run as written: Linen, NNX and a plain apply
function through the same calls."""

import re
from pathlib import Path

import numpy as np


def _blocks():
  text = (Path(__file__).parents[2] / "README.md").read_text()
  return re.findall(r"```python\n(.*?)```", text, re.S)


def test_readme_python_api_example_runs(capsys):
  namespace = {}
  exec(compile(_blocks()[0], "README.md", "exec"), namespace)  # noqa: S102
  out = capsys.readouterr().out
  assert "trainable:" in out and "head" in out
  assert np.isfinite(float(namespace["metrics"]["loss"]))


def test_readme_nnx_and_apply_function_examples_run():
  nnx_block, fn_block = _blocks()[1:3]
  assert "nnx.Module" in nnx_block and "apply_fn" in fn_block
  namespace = {}
  exec(compile(nnx_block, "README.md", "exec"), namespace)  # noqa: S102
  model, state = namespace["model"], namespace["state"]
  np.testing.assert_array_equal(model.head.kernel[...], state.params["head"]["kernel"])
  np.testing.assert_array_equal(model.backbone.kernel[...],
                                state.params["backbone"]["kernel"])  # frozen, written back
  assert np.isfinite(float(namespace["metrics"]["loss"]))
  # The module is usable afterwards (issue 27, bug 4: update_module left read-only
  # host arrays, and the train-mode call's BatchNorm update failed on them).
  assert namespace["logits"].shape == (8, 3) and np.isfinite(namespace["logits"]).all()
  model.train()
  before = np.array(model.bn.mean[...])
  model(namespace["batch"]["inputs"] + 1.0)
  assert not np.allclose(model.bn.mean[...], before)  # the statistics were written
  namespace = {}
  exec(compile(fn_block, "README.md", "exec"), namespace)  # noqa: S102
  trained = namespace["state"].params
  assert np.abs(trained["head"]["w"]).sum() > 0  # the head moved from zeros
  np.testing.assert_array_equal(trained["body"]["w"], np.float32(0.1))  # the frozen body did not


def _block(marker):
  (block,) = [b for b in _blocks() if marker in b]
  return block


def test_readme_pmap_example_and_its_batchnorm_claims():
  """The pmap example runs; with axis_name="batch" its BatchNorm trains as
  the mesh does (global batch statistics), without it per device."""
  import jax
  import jtl
  namespace = {}
  exec(compile(_block("pmap_train_step"), "README.md", "exec"), namespace)  # noqa: S102
  assert np.isfinite(float(namespace["metrics"]["loss"][0]))
  module_cls, variables, labels, tx, batch = (namespace[k] for k in (
      "BNNet", "variables", "labels", "tx", "batch"))
  state0 = jtl.create_train_state(variables, labels, tx)

  def on_mesh():
    mesh = jtl.make_mesh()
    step = jtl.jit_train_step(jtl.make_train_step(module_cls(axis_name=None), tx, labels=labels),
                              mesh)
    state, _ = step(jtl.place_state(state0, mesh), jtl.shard_batch(batch, mesh))
    return jax.device_get(state)

  def on_pmap(axis_name):
    step = jtl.parallel.pmap_train_step(jtl.make_train_step(module_cls(axis_name=axis_name), tx,
                                                   labels=labels, axis_name="batch"))
    state, _ = step(jtl.parallel.replicate(state0), jtl.parallel.shard_for_pmap(batch))
    return jax.device_get(jtl.parallel.unreplicate(state))

  mesh, synced, per_device = on_mesh(), on_pmap("batch"), on_pmap(None)
  np.testing.assert_allclose(namespace["state"].params["head"]["kernel"],
                             synced.params["head"]["kernel"], atol=1e-6)
  want = jtl.tree.flatten(mesh.variables)
  assert set(jtl.tree.flatten(synced.variables)) == set(want)
  for path, x in jtl.tree.flatten(synced.variables).items():
    np.testing.assert_allclose(x, want[path], atol=1e-5, err_msg=path)
  # Per-device statistics: 4 examples per device instead of the whole batch.
  assert not np.allclose(per_device.params["head"]["kernel"], mesh.params["head"]["kernel"],
                         atol=1e-4)
  var = lambda s: s.model_state["batch_stats"]["bn"]["var"]
  assert np.abs(var(per_device) - var(mesh)).max() > 1e-4


def _small_run(workdir, photos):
  from configs import default

  from jtl.app import experiment
  c = default.get_config()
  c.model, c.pretrained, c.image_size, c.dataset = "small_cnn", False, 16, f"folder:{photos}"
  c.strategy.rules, c.strategy.precise_batchnorm, c.eval_split = ((".*", "all"),), 0, "train"
  c.batch_size, c.eval_batch_size, c.num_steps, c.warmup_steps = 8, 8, 2, 0
  c.eval_every = c.checkpoint_every = 2
  experiment.finetune(c, workdir, progress=False)


def test_readme_restore_examples_run(tmp_path):
  """"Restore a run in your code": a finetune run (small CNN, 16 px) back as
  NNX, Linen and an apply function with its own preprocessing; an NNX model
  trained by `jtl.train.fit` back into a fresh module."""
  from PIL import Image
  for c in range(2):
    (tmp_path / "photos" / f"c{c}").mkdir(parents=True)
    for i in range(8):
      x = np.random.default_rng(i).integers(0, 80, (18, 22, 3)) + 150 * np.eye(3)[c]
      Image.fromarray(x.astype(np.uint8)).save(tmp_path / "photos" / f"c{c}" / f"{i}.png")
  _small_run(tmp_path / "run", tmp_path / "photos")
  block = _block("workdirs.load")
  assert '"runs/default"' in block
  namespace = {}
  exec(compile(block.replace('"runs/default"', repr(str(tmp_path / "run"))), "README.md",  # noqa: S102
               "exec"), namespace)
  run, images = namespace["run"], namespace["images"]
  assert namespace["preprocess"](images).shape == (2, 16, 16, 3)  # the run's size, not 28
  want = run.module.apply(run.variables, run.preprocess(images))
  np.testing.assert_allclose(namespace["logits"], want, atol=1e-5)
  np.testing.assert_allclose(namespace["model"](namespace["preprocess"](images)), want, atol=1e-5)

  import jax
  import jax.numpy as jnp

  import jtl
  nnx_ns = {}
  exec(compile(_blocks()[1], "README.md", "exec"), nnx_ns)  # noqa: S102  the NNX Net
  model, labels, tx = nnx_ns["model"], nnx_ns["labels"], nnx_ns["tx"]
  data = lambda start: iter([{"inputs": np.ones((8, 16), np.float32) * (i % 3),
                              "label": np.full((8,), i % 3, np.int32)} for i in range(5)])
  result = jtl.train.fit(module=model, variables=None, labels=labels, tx=tx, train_batches=data,
                         num_steps=3, workdir=tmp_path / "nnx", checkpoint_every=3,
                         progress=False)
  nnx_ns["workdir"] = tmp_path / "nnx"
  exec(compile(_block("restore_variables(workdir"), "README.md", "exec"), nnx_ns)  # noqa: S102
  restored = nnx_ns["restored"]
  trained = jax.device_get(result.state)
  np.testing.assert_array_equal(restored.head.kernel[...], trained.params["head"]["kernel"])
  np.testing.assert_array_equal(restored.bn.mean[...], trained.model_state["state"]["bn"]["mean"])
  del jnp
