import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models_for_tests import MLP, ConvNet, batch, init, mlp_setup

import jtl
from jtl.errors import StepError

HEAD_ONLY = [("head/.*", "head"), (".*", "frozen")]


def setup(rules, *, model=None, lr=0.1, optimizer="sgd", clip=None, seed=0, **kw):
  model = model or ConvNet()
  b = batch(16)
  variables = init(model, b["inputs"], seed)
  labels = jtl.label_params(variables["params"], rules)
  tx = jtl.make_optimizer(labels, learning_rate=lr, optimizer=optimizer, clip_norm=clip)
  state = jtl.create_train_state(variables, labels, tx, rng=1)
  step = jtl.make_train_step(model, tx, labels=labels, **kw)
  return model, variables, labels, state, step, b


def test_frozen_leaves_and_frozen_bn_stats_do_not_change():
  model, variables, labels, state, step, b = setup(HEAD_ONLY)
  new, metrics = jax.jit(step)(state, b)
  before, after = jtl.tree.flatten(variables["params"]), jtl.tree.flatten(new.params)
  for path in before:
    if path.startswith("head/"):
      assert not np.allclose(before[path], after[path]), path
    else:
      np.testing.assert_array_equal(before[path], after[path])
  # Frozen BatchNorm layers used and kept their stored statistics.
  for a, c in zip(jax.tree.leaves(variables["batch_stats"]), jax.tree.leaves(new.model_state)):
    np.testing.assert_array_equal(a, c)
  assert int(new.step) == 1 and np.isfinite(metrics["loss"])


def test_frozen_bn_forward_equals_eval_mode():
  model, variables, labels, state, step, b = setup(HEAD_ONLY)
  eval_logits = model.apply(variables, b["inputs"], train=False)
  with jtl.adapter.frozen_batchnorm(jtl.partition.frozen_module_paths(labels)):
    train_logits, _ = model.apply(variables, b["inputs"], train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(train_logits, eval_logits, atol=1e-6)


def test_frozen_bn_with_the_flag_in_the_constructor_or_positional():
  import flax.linen as nn

  class Net(nn.Module):  # flax examples' style (constructor flag), and a positional flag
    @nn.compact
    def __call__(self, x, train=False):
      x = nn.BatchNorm(use_running_average=not train, name="bn0")(nn.Dense(3)(x))
      x = nn.BatchNorm(momentum=0.5, name="bn1")(x, not train)
      return nn.BatchNorm(momentum=0.5, name="bn2")(x, use_running_average=not train)

  x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32) + 3.0
  v = Net().init(jax.random.PRNGKey(0), x)
  with jtl.adapter.frozen_batchnorm(["bn0", "bn1"]):
    out, new = Net().apply(v, x, train=True, mutable=["batch_stats"])
  for name in ("bn0", "bn1"):  # stored statistics used and kept
    jax.tree.map(np.testing.assert_array_equal, new["batch_stats"][name], v["batch_stats"][name])
  assert not np.allclose(new["batch_stats"]["bn2"]["mean"], v["batch_stats"]["bn2"]["mean"])
  np.testing.assert_allclose(np.asarray(out).mean(0), 0.0, atol=1e-5)  # bn2 on batch statistics


def test_trainable_bn_updates_its_statistics():
  rules = [("backbone_bn2/.*", "bn"), ("head/.*", "head"), (".*", "frozen")]
  model, variables, labels, state, step, b = setup(rules)
  new, _ = jax.jit(step)(state, b)
  old_stats, new_stats = variables["batch_stats"], new.model_state["batch_stats"]
  assert not np.allclose(old_stats["backbone_bn2"]["mean"], new_stats["backbone_bn2"]["mean"])
  np.testing.assert_array_equal(old_stats["backbone_bn0"]["mean"], new_stats["backbone_bn0"]["mean"])


def test_gradient_matches_full_gradient_on_trainable_leaves():
  model, variables, labels, state, step, b = setup(HEAD_ONLY, lr=1.0)
  new, metrics = jax.jit(step)(state, b)

  def full_loss(params):
    with jtl.adapter.frozen_batchnorm(jtl.partition.frozen_module_paths(labels)):
      logits, _ = model.apply({**variables, "params": params}, b["inputs"], train=True,
                              mutable=["batch_stats"])
    return jtl.losses.cross_entropy_loss(logits, b)

  full_grads = jax.jit(jax.grad(full_loss))(variables["params"])
  # SGD with lr 1: update = -grad.
  np.testing.assert_allclose(variables["params"]["head"]["kernel"] - new.params["head"]["kernel"],
                             full_grads["head"]["kernel"], atol=1e-6)
  head_norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(full_grads["head"])))
  np.testing.assert_allclose(metrics["grad_norm"], head_norm, rtol=1e-5)


def test_same_step_with_and_without_jit():
  # SGD, not Adam: Adam would amplify the ~1e-9 gradients of conv biases
  # followed by BatchNorm (zero in exact arithmetic) into +-lr noise.
  *_, state, step, b = setup([("head/.*", "head"), (".*", "body")], optimizer="sgd", lr=0.1)
  a, ma = step(state, b)
  c, mc = jax.jit(step)(state, b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)):
    np.testing.assert_allclose(x, y, atol=1e-5)
  np.testing.assert_allclose(ma["loss"], mc["loss"], rtol=1e-6)


def test_compiled_flops_frozen_backbone_close_to_forward():
  model = ConvNet(width=32)
  b = batch(32, size=32)
  variables = init(model, b["inputs"])
  labels = jtl.label_params(variables["params"], HEAD_ONLY)
  tx = jtl.make_optimizer(labels, learning_rate=0.1, optimizer="adamw", clip_norm=1.0,
                          weight_decay=1e-4)
  state = jtl.create_train_state(variables, labels, tx)
  step = jtl.make_train_step(model, tx, labels=labels)  # logs grad_norm, clips

  def flops(fn, *args):
    return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]

  forward = flops(lambda v, x: model.apply(v, x, train=False), variables, b["inputs"])
  frozen_step = flops(step, state, b)
  all_labels = jtl.label_params(variables["params"], [(".*", "all")])
  full_tx = jtl.make_optimizer(all_labels, learning_rate=0.1, clip_norm=1.0)
  full_step = flops(jtl.make_train_step(model, full_tx, labels=all_labels),
                    jtl.create_train_state(variables, all_labels, full_tx), b)
  assert frozen_step <= 1.3 * forward, (frozen_step / forward)
  assert full_step >= 2.0 * forward, (full_step / forward)  # the test can tell them apart


def test_microbatches_give_the_full_batch_update():
  model = MLP()
  b = batch(16, classes=4)
  variables = init(model, b["inputs"])
  labels = jtl.label_params(variables["params"], [(".*", "all")])
  tx = jtl.make_optimizer(labels, learning_rate=1e-2, optimizer="adam")
  state = jtl.create_train_state(variables, labels, tx)
  full = jax.jit(jtl.make_train_step(model, tx, labels=labels))
  micro = jax.jit(jtl.make_train_step(model, tx, labels=labels, microbatches=4))
  s1, s4 = state, state
  for _ in range(3):
    s1, m1 = full(s1, b)
    s4, m4 = micro(s4, b)
  for x, y in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
    np.testing.assert_allclose(x, y, atol=2e-6)  # tolerance: fp32 summation order
  np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
  with pytest.raises(StepError, match="does not divide into 3 micro-batches"):
    jtl.make_train_step(model, tx, labels=labels, microbatches=3)(state, b)


class _BNHead(nn.Module):
  """BatchNorm on the inputs themselves, so its batch statistics are known."""

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    x = nn.BatchNorm(momentum=0.9, name="bn")(x, use_running_average=not train)
    return nn.Dense(4, name="head")(x)


def test_microbatches_move_batchnorm_statistics_once_per_step():
  """4 micro-batches (rows i, i+4, ...): one momentum update with the mean of
  their 4 batch means and variances, not 4 updates (0.9**4: 3.44x as far)."""
  x = np.random.RandomState(0).randn(16, 6).astype(np.float32) * 2.0 + 3.0
  b = {"inputs": x, "label": np.arange(16, dtype=np.int32) % 4}
  model = _BNHead()
  variables = init(model, x)
  labels = jtl.label_params(variables["params"], [(".*", "all")])
  tx = jtl.make_optimizer(labels, learning_rate=0.1, optimizer="sgd")
  step = jax.jit(jtl.make_train_step(model, tx, labels=labels, microbatches=4))
  new, _ = step(jtl.create_train_state(variables, labels, tx), b)
  stats = new.model_state["batch_stats"]["bn"]
  parts = [x[i::4] for i in range(4)]
  mean = np.mean([p.mean(0) for p in parts], 0)
  var = np.mean([p.var(0) for p in parts], 0)
  np.testing.assert_allclose(stats["mean"], 0.1 * mean, rtol=1e-5)  # from 0
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * var, rtol=1e-5)  # from 1
  assert np.abs(var - x.var(0)).max() > 0.05  # per micro-batch, not the whole batch's
  head = jtl.label_params(variables["params"], HEAD_ONLY)  # a frozen BatchNorm stays bit for bit
  tx = jtl.make_optimizer(head, learning_rate=0.1, optimizer="sgd")
  step = jax.jit(jtl.make_train_step(model, tx, labels=head, microbatches=4))
  new, _ = step(jtl.create_train_state(variables, head, tx), b)
  for a, c in zip(jax.tree.leaves(new.model_state), jax.tree.leaves(variables["batch_stats"])):
    np.testing.assert_array_equal(a, c)


def test_a_donating_step_leaves_the_callers_variables_usable():
  """Without place_state: the state holds copies, so the donated state is not
  the caller's pretrained variables (kept for WiSE-FT, L2-SP)."""
  model = ConvNet(width=8)
  b = jax.tree.map(np.asarray, batch(8))
  variables = jax.device_put(init(model, b["inputs"]))  # e.g. weights loaded onto the device
  before = np.asarray(model.apply(variables, b["inputs"]))
  labels = jtl.label_params(variables["params"], HEAD_ONLY)
  tx = jtl.make_optimizer(labels, learning_rate=0.1, optimizer="sgd")
  mesh = jtl.make_mesh(jax.devices()[:1])
  rng = jax.random.PRNGKey(1)
  state = jtl.create_train_state(variables, labels, tx, rng=rng)
  step = jtl.jit_train_step(jtl.make_train_step(model, tx, labels=labels), mesh)  # donates
  state, _ = step(state, jtl.shard_batch(b, mesh))
  assert not any(x.is_deleted() for x in jax.tree.leaves((variables, rng)))
  np.testing.assert_array_equal(model.apply(variables, b["inputs"]), before)
  moved = np.abs(state.params["head"]["kernel"] - variables["params"]["head"]["kernel"]).max()
  assert moved > 1e-4


def test_bf16_compute_keeps_fp32_master_params():
  *_, state, step, b = setup([(".*", "all")], optimizer="adam", lr=1e-3,
                             compute_dtype=jnp.bfloat16)
  new, metrics = jax.jit(step)(state, b)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new.params))
  assert np.isfinite(metrics["loss"])
  _, fp32_metrics = jax.jit(setup([(".*", "all")], optimizer="adam", lr=1e-3)[4])(state, b)
  np.testing.assert_allclose(metrics["loss"], fp32_metrics["loss"], rtol=5e-2)


def test_compute_dtype_must_be_floating():
  """An integer compute dtype cast every weight to 0 and trained nothing;
  a dtype's name is taken as the dtype."""
  model, variables, labels, tx = mlp_setup()
  for bad, shown in ((jnp.int8, "int8"), ("int32", "int32"), ("fp8", "'fp8'")):
    with pytest.raises(StepError, match=f"compute_dtype={shown} is not a floating dtype"):
      jtl.make_train_step(model, tx, labels=labels, compute_dtype=bad)
    with pytest.raises(StepError, match=f"compute_dtype={shown} is not a floating"):
      jtl.make_eval_step(model, compute_dtype=bad)
  with pytest.raises(StepError, match="compute_dtype=int8 is not a floating dtype"):
    jtl.train.fit(module=model, variables=variables, labels=labels, tx=tx, num_steps=1,
                  train_batches=lambda start: iter([batch(8, classes=4)]), progress=False,
                  compute_dtype=jnp.int8)
  state = jtl.create_train_state(variables, labels, tx)
  b = batch(8, classes=4)
  by_name, by_type = (jax.jit(jtl.make_train_step(model, tx, labels=labels, compute_dtype=d))(
      state, b)[0] for d in ("bfloat16", jnp.bfloat16))
  np.testing.assert_array_equal(by_name.params["head"]["kernel"], by_type.params["head"]["kernel"])
  moved = by_name.params["head"]["kernel"] - variables["params"]["head"]["kernel"]
  assert np.abs(moved).max() > 1e-3


def test_dropout_rng_changes_every_step():
  model = ConvNet(dropout=0.5)
  _, variables, labels, state, step, b = setup([(".*", "all")], model=model, lr=0.0)
  s1, m1 = jax.jit(step)(state, b)
  s2, m2 = jax.jit(step)(s1, b)
  assert not np.array_equal(state.rng, s1.rng)
  assert float(m1["loss"]) != float(m2["loss"])  # lr 0: only the dropout mask differs


def test_eval_counts_masked_batch_exactly():
  model = MLP()
  b = batch(8, classes=4)
  variables = init(model, b["inputs"])
  eval_step = jax.jit(jtl.make_eval_step(model))
  logits = model.apply(variables, b["inputs"])
  mask = np.array([1, 1, 1, 0, 1, 0, 0, 1], bool)
  sums = eval_step(variables, {**b, "mask": mask})
  assert float(sums["count"]) == 5
  expected_correct = np.sum((np.argmax(logits, -1) == b["label"]) & mask)
  assert float(sums["correct"]) == expected_correct
  ce = -jax.nn.log_softmax(logits)[np.arange(8), b["label"]]
  np.testing.assert_allclose(sums["loss"], np.sum(np.where(mask, ce, 0)), rtol=1e-5)
  assert "correct_top5" not in sums  # 4 classes: always in the top 5, not reported
  summary = jtl.eval_steps.summarize_eval(sums)
  assert summary["count"] == 5 and 0 <= summary["accuracy"] <= 1
  assert "top5_accuracy" not in summary


def test_step_compiles_once_for_a_fixed_batch_shape():
  model, variables, labels, state, _, b = setup(HEAD_ONLY)
  tx = jtl.make_optimizer(labels, learning_rate=0.1, optimizer="sgd")
  traces = []
  inner = jtl.make_train_step(model, tx, labels=labels)

  def counted(state, batch):
    traces.append(1)
    return inner(state, batch)

  step = jax.jit(counted)
  for i in range(4):
    state, _ = step(state, batch(16, seed=i))
  assert len(traces) == 1
  step(state, batch(8))
  assert len(traces) == 2  # a new batch shape compiles again, as expected


def test_non_scalar_loss_is_rejected():
  model, variables, labels, state, _, b = setup(HEAD_ONLY)
  tx = jtl.make_optimizer(labels, learning_rate=0.1)
  bad = jtl.make_train_step(model, tx, labels=labels,
                            loss_fn=lambda logits, batch: jnp.sum(logits, axis=-1))
  with pytest.raises(StepError, match=r"scalar, got shape \(16,\)"):
    bad(state, b)


class _TupleNet(nn.Module):
  as_dict: bool = False

  @nn.compact
  def __call__(self, x, *, train=False):
    h = nn.Dense(8, name="body")(x)
    logits = nn.Dense(3, name="head")(h)
    return {"logits": logits, "feat": h} if self.as_dict else (logits, {"feat": h})


def test_default_loss_takes_the_logits_as_evaluation_does():
  x = np.linspace(-1, 1, 16, dtype=np.float32).reshape(4, 4)
  b = {"inputs": x, "label": np.array([0, 1, 2, 0], np.int32)}
  variables = _TupleNet().init(jax.random.PRNGKey(0), x)
  labels = jtl.label_params(variables["params"], [(".*", "all")])
  tx = jtl.make_optimizer(labels, learning_rate=0.1, optimizer="sgd")
  state = jtl.create_train_state(variables, labels, tx)
  logits = _TupleNet().apply(variables, x)[0]
  ce = float(np.mean(-jax.nn.log_softmax(logits)[np.arange(4), b["label"]]))
  # A tuple (logits, aux): trained and scored by its first element alike.
  _, metrics = jax.jit(jtl.make_train_step(_TupleNet(), tx, labels=labels))(state, b)
  sums = jax.jit(jtl.make_eval_step(_TupleNet()))(variables, b)
  np.testing.assert_allclose([metrics["loss"], sums["loss"] / 4], [ce, ce], rtol=1e-5)
  # A dict: the loss says what to pass, at trace time; an adapter's output= picks them.
  with pytest.raises(StepError, match=r"returned a dict with keys \['feat', 'logits'\]\. "
                                      r"Pass loss_fn=.*output='logits'"):
    jax.eval_shape(jtl.make_train_step(_TupleNet(True), tx, labels=labels), state, b)
  picked = jtl.LinenModel(_TupleNet(True), output="logits")
  _, metrics = jax.jit(jtl.make_train_step(picked, tx, labels=labels))(state, b)
  np.testing.assert_allclose(metrics["loss"], ce, rtol=1e-5)


def test_batches_of_another_format_say_what_to_rename():
  model, variables, labels, state, step, b = setup(HEAD_ONLY, model=MLP())
  x, y = b["inputs"], np.arange(16) % 4
  fmt = r"must be a dict with 'inputs' and 'label' .*; got "
  for bad, fix in [((x, y), r"a tuple of 2\. Turn \(x, y\) pairs into"),
                   ({"image": x, "labels": y}, r"a dict with keys \['image', 'labels'\], without "
                    r"'inputs' and 'label'\. Rename 'image' -> 'inputs', 'labels' -> 'label'\."),
                   ({"inputs": x, "y": y}, r".*, without 'label'\. Rename 'y' -> 'label'\.")]:
    with pytest.raises(StepError, match="A training batch " + fmt + fix):
      jax.eval_shape(step, state, bad)
  with pytest.raises(StepError, match=r"An evaluation batch .*Rename 'x' -> 'inputs'"):
    jax.eval_shape(jtl.make_eval_step(model), variables, {"x": x, "label": y})
  # Other keys pass on to the loss; a custom loss with a mask needs no label.
  _, extra = jax.jit(step)(state, {"inputs": x, "label": y, "weight": np.ones(16)})
  logits = model.apply(variables, x)
  ce = -jax.nn.log_softmax(logits)[np.arange(16), y]
  np.testing.assert_allclose(extra["loss"], np.mean(ce), rtol=1e-5)
  tx = jtl.make_optimizer(labels)
  unlabeled = jtl.make_train_step(model, tx, labels=labels, loss_fn=lambda out, _: jnp.mean(out**2))
  _, m = jax.jit(unlabeled)(jtl.create_train_state(variables, labels, tx),
                            {"inputs": x, "mask": np.ones(16, bool)})
  np.testing.assert_allclose(m["loss"], np.mean(np.asarray(logits) ** 2), rtol=1e-5)


def test_names_that_moved_out_of_steps_are_found_with_a_warning():
  with pytest.warns(DeprecationWarning, match=r"jtl.steps.make_eval_step is now jtl.eval_steps"):
    assert jtl.steps.make_eval_step is jtl.eval_steps.make_eval_step
  with pytest.warns(DeprecationWarning, match=r"jtl.losses.masked_mean"):
    assert jtl.steps.masked_mean is jtl.losses.masked_mean
  with pytest.raises(AttributeError, match="no attribute 'nothing'"):
    jtl.steps.nothing  # noqa: B018
