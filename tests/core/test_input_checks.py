"""Bad input to the library API fails loudly, before a training step, with a
JtlError saying what is wrong; and phase switches keep optimizer state across
optimizers of different shapes."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jtl
from jtl import phases
from jtl.errors import CheckpointError, CheckpointMismatchError, OptimizerError, StepError
from jtl.partition import UnusedRuleWarning


class Net(nn.Module):
  @nn.compact
  def __call__(self, x, *, train=False):
    return nn.Dense(3, name="head")(nn.relu(nn.Dense(16, name="backbone")(x)))


def _setup(rules=(("head/.*", "head"), (".*", "frozen"))):
  net = Net()
  variables = net.init(jax.random.PRNGKey(0), jnp.ones((1, 8)))
  labels = jtl.label_params(variables["params"], list(rules))
  return net, variables, labels, jtl.make_optimizer(labels, learning_rate=1e-2)


def _batch(label):
  rng = np.random.default_rng(0)
  return {"inputs": rng.normal(size=(len(label), 8)).astype(np.float32), "label": label}


def _fit(label=None, batches=None, **kw):
  net, variables, labels, tx = _setup()
  batch = _batch(np.arange(8) % 3 if label is None else label)
  batches = batches or (lambda start: iter([batch] * 4))
  return jtl.train.fit(module=net, variables=variables, labels=labels, tx=tx,
                       train_batches=batches, num_steps=2, progress=False, **kw)


def test_labels_with_a_trailing_axis_are_refused_not_broadcast():
  net, variables, labels, tx = _setup()
  state = jtl.create_train_state(variables, labels, tx)
  step = jtl.make_train_step(net, tx, labels=labels)
  with pytest.raises(StepError, match=r"Labels of shape \(8, 1\).*Squeeze the last axis"):
    step(state, _batch(np.zeros((8, 1), np.int32)))
  with pytest.raises(StepError, match=r"Labels of shape \(4,\).*logits of shape \(8, 3\)"):
    step(state, {**_batch(np.zeros(8, np.int32)), "label": np.zeros(4, np.int32)})
  # Soft labels of the logits' shape and class indices are what it takes.
  _, soft = step(state, _batch(np.full((8, 3), 1 / 3, np.float32)))
  _, hard = step(state, _batch(np.zeros(8, np.int32)))
  assert np.isfinite(soft["loss"]) and np.isfinite(hard["loss"])


@pytest.mark.parametrize("label", [np.full(8, 7), np.full(8, -1)])
def test_fit_refuses_labels_outside_the_heads_classes_before_a_step(label):
  with pytest.raises(StepError, match=r"labels from (7|-1) to (7|-1), but the model's logits "
                                      r"have 3 classes"):
    _fit(label)


def test_padding_rows_masked_out_may_carry_any_label():
  label = np.array([0, 1, 2, 0, 1, 2, -1, -1])
  batch = {**_batch(label), "mask": label >= 0}
  result = _fit(batches=lambda start: iter([batch] * 4))
  assert int(result.state.step) == 2


def test_fit_names_what_train_batches_must_be():
  batch = _batch(np.zeros(8, np.int64))
  with pytest.raises(StepError, match="takes a function start_step -> iterator"):
    _fit(batches=[batch])
  with pytest.raises(StepError, match="ran out before step 2 of num_steps=2"):
    _fit(batches=lambda start: iter([batch]))
  with pytest.raises(StepError, match="must be a dict with 'inputs' and 'label'.*"
                                      "Rename 'x' -> 'inputs', 'y' -> 'label'"):
    _fit(batches=lambda start: iter([{"x": batch["inputs"], "y": batch["label"]}] * 2))
  with pytest.raises(StepError, match=r"fit\(eval_batches=...\) takes a function"):
    _fit(eval_batches=[batch])


class DictNet(nn.Module):
  @nn.compact
  def __call__(self, x, *, train=False):
    return {"logits": Net(name="net")(x)}


def test_fit_traces_the_default_loss_before_the_first_step():
  # A dict output and the default loss: fit's check traces the training step
  # first, so its advice (an adapter's output=, which training and evaluation
  # both read) comes before the evaluation check's and before any step.
  variables = DictNet().init(jax.random.PRNGKey(0), jnp.ones((1, 8)))
  labels = jtl.label_params(variables["params"], [(".*", "all")])
  batch = _batch(np.arange(8) % 3)
  kw = dict(variables=variables, labels=labels, tx=jtl.make_optimizer(labels), num_steps=1,
            train_batches=lambda start: iter([batch]), progress=False,
            eval_batches=lambda: [{**batch, "mask": np.ones(8, bool)}])
  steps_run = []
  with pytest.raises(StepError, match=r"default loss .* returned a dict with keys \['logits'\]"
                                      r"\. Pass loss_fn=.*output='logits'"):
    jtl.train.fit(module=DictNet(), log_every=1, on_log=lambda s, m: steps_run.append(s), **kw)
  assert steps_run == []
  result = jtl.train.fit(module=jtl.LinenModel(DictNet(), output="logits"), **kw)
  logits = DictNet().apply({"params": result.state.params}, batch["inputs"])["logits"]
  ce = -jax.nn.log_softmax(logits)[np.arange(8), batch["label"]]
  assert result.eval_metrics["loss"] == pytest.approx(float(np.mean(ce)), rel=1e-5)


def test_resuming_with_other_rules_is_a_checkpoint_error_naming_the_leaves(tmp_path):
  net, variables, labels, tx = _setup()
  batch = _batch(np.arange(8) % 3)
  kw = dict(module=net, variables=variables, train_batches=lambda s: iter([batch] * 4),
            progress=False, workdir=tmp_path)
  jtl.train.fit(labels=labels, tx=tx, num_steps=2, **kw)
  _, _, all_labels, all_tx = _setup(((".*", "all"),))
  with pytest.raises(CheckpointError, match=r"another partition or optimizer(.|\n)*"
                                            r"opt_state/0/mu/backbone/kernel"):
    jtl.train.fit(labels=all_labels, tx=all_tx, num_steps=3, **kw)
  # Fewer leaves trained than saved (the backbone frozen on resume): Orbax
  # restored the head's subset and dropped the backbone's moments silently.
  kw["workdir"] = tmp_path / "all"
  jtl.train.fit(labels=all_labels, tx=all_tx, num_steps=2, **kw)
  with pytest.raises(CheckpointMismatchError,
                     match=r"checkpoints/2: (.|\n)*In this run, not in the checkpoint:\n  "
                           r"\(none\)\nIn the checkpoint, not in this run:\n  - "
                           r"opt_state/0/mu/backbone/bias\n  - opt_state/0/mu/backbone/kernel"):
    jtl.train.fit(labels=labels, tx=tx, num_steps=3, **kw)


def _phased_fit(workdir, *, switch, num_steps):
  """The head alone, then everything from step `switch` (LP-FT's shape)."""
  net, variables, head, head_tx = _setup()
  _, _, full, full_tx = _setup(((".*", "all"),))
  batches = [_batch(np.arange(8) % 3)] * 8
  evals = lambda: [{**_batch(np.arange(8) % 3), "mask": np.ones(8, bool)}]
  return jtl.train.fit(module=net, variables=variables, labels=head, tx=head_tx,
                       later_phases=[(switch, full, full_tx)], num_steps=num_steps,
                       train_batches=lambda s: iter(batches[s:]), eval_batches=evals,
                       eval_every=1, checkpoint_every=1, best_metric="loss", keep=10,
                       async_checkpoints=False, progress=False, workdir=workdir)


def _on_disk(workdir):
  return sorted(p.name for p in (workdir / "checkpoints").iterdir())


def test_a_resume_into_a_partition_that_trains_more_keeps_every_checkpoint(tmp_path):
  """The head alone trained steps 1-3; rerun with the switch at step 2, step
  3 lies in the fine-tuning phase: refused at step 3, not taken for damage
  (which renamed step 3, the best, to 3.damaged and rewound to step 2)."""
  _phased_fit(tmp_path, switch=10, num_steps=3)
  best = jtl.checkpoint.CheckpointManager(tmp_path, best_metric="loss").best_step()
  with pytest.raises(CheckpointMismatchError,
                     match=r"checkpoints/3: the checkpoint does not fit the state of this run: "
                           r"it was saved with another partition or optimizer(.|\n)*In this "
                           r"run, not in the checkpoint:\n  - opt_state/0/mu/backbone/bias"):
    _phased_fit(tmp_path, switch=2, num_steps=4)
  assert _on_disk(tmp_path) == ["1", "2", "3"] and best == 3


def _adam_counts(opt_state):
  return {p: int(v) for p, v in jtl.tree.flatten(opt_state).items() if p.endswith("count")}


def test_phase_switch_carries_moments_across_a_reshaped_chain():
  """A probe with one optimizer shape, then fine-tuning with per-label rates
  (another chain): the head's moments and the counts carry over."""
  params = {"body": {"w": jnp.ones((4, 4))}, "head": {"w": jnp.ones((4, 2))}}
  probe = jtl.label_params(params, [("head/.*", "head"), (".*", None)])
  tune = jtl.label_params(params, [("head/.*", "head"), (".*", "body")])
  tx_probe = jtl.make_optimizer(probe, learning_rate=0.5)
  schedule = optax.cosine_decay_schedule(1.0, 10)
  tx_tune = jtl.make_optimizer(tune, learning_rate=schedule, lr_multipliers={"body": 0.1})
  state = jtl.create_train_state({"params": params}, probe, tx_probe)
  step = jax.jit(jtl.make_train_step(lambda p, x: x @ p["body"]["w"] @ p["head"]["w"],
                                     tx_probe, labels=probe))
  batch = {"inputs": jnp.ones((2, 4)), "label": jnp.zeros(2, jnp.int32)}
  for _ in range(5):
    state, _ = step(state, batch)
  switched = phases.switch_phase(state, tune, tx_tune)
  flat = jtl.tree.flatten(switched.opt_state)
  head_mu = [v for p, v in flat.items() if p.endswith("mu/head/w")]
  body_mu = [v for p, v in flat.items() if p.endswith("mu/body/w")]
  old_mu = [v for p, v in jtl.tree.flatten(state.opt_state).items() if p.endswith("mu/head/w")]
  np.testing.assert_array_equal(head_mu[0], old_mu[0])
  assert float(np.abs(head_mu[0]).sum()) > 0 and float(np.abs(body_mu[0]).sum()) == 0
  # Every count (Adam's and the schedule's) continues at step 5.
  assert set(_adam_counts(switched.opt_state).values()) == {5}


def test_a_schedule_after_a_constant_rate_continues_at_the_step():
  params = {"w": jnp.ones(3)}
  constant = optax.adam(0.5)
  scheduled = optax.adam(optax.linear_schedule(1.0, 0.0, 10))
  old = constant.init(params)
  old = (old[0]._replace(count=jnp.int32(4)),) + tuple(old[1:])
  new = phases.transfer_opt_state(old, scheduled.init(params), step=4)
  assert set(_adam_counts(new).values()) == {4}


def test_make_optimizer_refuses_options_it_would_drop():
  labels = {"w": "all"}
  with pytest.raises(OptimizerError, match="give the decay to the factory itself"):
    jtl.make_optimizer(labels, optimizer=optax.sgd, weight_decay=0.5)
  with pytest.raises(OptimizerError, match=r"weight_decay=0.1 would be ignored"):
    jtl.make_optimizer(labels, per_label={"all": optax.sgd(0.1)}, weight_decay=0.1)
  decayed = jtl.make_optimizer(labels, optimizer=functools.partial(optax.adamw,
                                                                   weight_decay=0.5))
  params = {"w": jnp.ones((2, 2))}
  updates, _ = decayed.update({"w": jnp.zeros((2, 2))}, decayed.init(params), params)
  assert float(jnp.abs(updates["w"]).sum()) > 0  # the factory's own decay applies


def test_label_params_warns_about_a_rule_that_labels_nothing():
  params = {"head": {"kernel": 0}, "body": {"kernel": 0}}
  with pytest.warns(UnusedRuleWarning, match=r"\('head', 'head'\).*must match the whole path"):
    labels = jtl.label_params(params, [("head", "head"), (".*", "frozen")])
  assert labels == {"head": {"kernel": "frozen"}, "body": {"kernel": "frozen"}}


def test_nnx_module_with_a_required_flag_gets_it_and_an_opt_out_names_the_wrapper():
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.body = nnx.Linear(4, 8, rngs=rngs)
      self.drop = nnx.Dropout(0.5, rngs=rngs)
      self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x, *, train: bool):
      return self.head(self.drop(nnx.relu(self.body(x)), deterministic=not train))

  class TwoFlags(Net):
    def __call__(self, x, *, train: bool = False, deterministic: bool = True):
      return super().__call__(x, train=train)

  model = Net(nnx.Rngs(params=0, dropout=1))
  labels = jtl.label_params(model, [("head/.*", "head"), (".*", "frozen")])
  tx = jtl.make_optimizer(labels, learning_rate=1e-2)
  state = jtl.create_train_state(model, labels, tx)
  batch = {"inputs": jnp.ones((8, 4)), "label": jnp.zeros((8,), jnp.int32)}
  with pytest.raises(StepError, match=r"requires train=, which NnxModel\(train_kwarg=None\) "
                     r"does not pass.*jtl.NnxModel\(module, train_kwarg='train'\)"):
    jtl.make_train_step(jtl.NnxModel(model, train_kwarg=None), tx, labels=labels)(state, batch)
  with pytest.raises(StepError, match=r"takes several mode flags \(train, deterministic\).*"
                     r"jtl.NnxModel\(module, train_kwarg='train'\)"):
    jtl.NnxModel(TwoFlags(nnx.Rngs(0)))
  assert jtl.NnxModel(model).train_kwarg == "train"  # the flag it takes is passed
  state, metrics = jax.jit(jtl.make_train_step(model, tx, labels=labels))(state, batch)
  evaluate = jax.jit(jtl.make_eval_step(model))
  # Evaluation passes train=False: dropout off, the same loss twice.
  first, second = evaluate(state.variables, batch), evaluate(state.variables, batch)
  assert float(first["loss"]) == float(second["loss"]) and np.isfinite(metrics["loss"])


def test_lora_finds_the_layers_of_a_linen_model_with_another_flag():
  from jtl.recipes import strategies

  class Enc(nn.Module):
    @nn.compact
    def __call__(self, x, *, deterministic: bool):
      h = nn.Dropout(0.1)(nn.relu(nn.Dense(16, name="backbone")(x)), deterministic=deterministic)
      return nn.Dense(3, name="head")(h)

  x = jnp.ones((4, 8))
  variables = Enc().init(jax.random.PRNGKey(0), x, deterministic=True)
  with pytest.raises(StepError, match="train_kwarg='deterministic'"):
    strategies.add_lora(Enc(), variables, x, targets="backbone", rank=2)
  model = jtl.LinenModel(Enc(), train_kwarg="deterministic")
  assert strategies.adaptable_layers(model, variables, x) == ["backbone", "head"]
  assert strategies.adaptable_layers(Enc(), variables, x, deterministic=True) == [
      "backbone", "head"]
  adapted = strategies.add_lora(model, variables, x, targets="backbone", rank=2)
  assert adapted["params"]["backbone"]["lora_a"].shape == (8, 2)


def test_rules_given_as_a_dict_say_they_must_be_ordered_pairs():
  with pytest.raises(jtl.JtlError, match=r"ordered list of \(regex, value\) pairs.*got a dict"):
    jtl.label_params({"head": {"kernel": 0}}, {"head/.*": "head"})


def test_apply_function_called_without_its_flag_names_the_wrapper_and_then_trains():
  """A plain apply function gets the StepError Linen and NNX modules get (not
  the function's TypeError), with the FunctionModel that calls it right."""
  def fn(params, x, *, train):
    return x @ params["head"]["kernel"]

  def plain(params, x):
    return x @ params["head"]["kernel"]

  params = {"head": {"kernel": np.zeros((8, 3), np.float32)}}
  labels = jtl.label_params(params, [(".*", "head")])
  tx = jtl.make_optimizer(labels, learning_rate=1e-2)
  state = jtl.create_train_state({"params": params}, labels, tx)
  batch = _batch(np.arange(8) % 3)
  fit = functools.partial(jtl.train.fit, variables={"params": params}, labels=labels, tx=tx,
                          train_batches=lambda start: iter([batch] * 2), num_steps=1,
                          progress=False)
  with pytest.raises(StepError, match=r"fn\(params, x, \*, train\) requires train=, which "
                     r"train_kwarg=None does not pass.*"
                     r"jtl.FunctionModel\(fn, train_kwarg='train'\)"):
    fit(module=jtl.FunctionModel(fn, train_kwarg=None))
  with pytest.raises(StepError, match=r"takes no 'training' argument.*fn\(params, inputs, "
                     r"training=...\).*jtl.FunctionModel\(fn, train_kwarg='train'\)"):
    fit(module=jtl.FunctionModel(fn, train_kwarg="training"))
  with pytest.raises(StepError, match=r"takes no 'train'.*FunctionModel\(plain, train_kwarg=None"):
    jtl.make_train_step(jtl.FunctionModel(plain, train_kwarg="train"), tx, labels=labels)(
        state, batch)
  with pytest.raises(StepError, match=r"takes no 'rng'.*FunctionModel\(fn, rng_kwarg=None\)"):
    jtl.make_eval_step(jtl.FunctionModel(fn, train_kwarg="train", rng_kwarg="rng"))(
        state.variables, batch)
  # The flag it takes is passed, read through jax.jit; a flag functools.partial
  # binds stays as bound; **kwargs passes.
  assert jtl.FunctionModel(jax.jit(fn, static_argnames="train")).train_kwarg == "train"
  jtl.make_eval_step(jax.jit(fn, static_argnames="train"))(state.variables, batch)
  assert jtl.FunctionModel(functools.partial(fn, train=False)).train_kwarg is None
  jtl.make_eval_step(functools.partial(fn, train=False))(state.variables, batch)
  jtl.make_eval_step(jtl.FunctionModel(lambda p, x, **kw: plain(p, x), train_kwarg="training"))(
      state.variables, batch)
  step = jax.jit(jtl.make_train_step(jtl.FunctionModel(fn, train_kwarg="train"), tx,
                                     labels=labels))
  assert np.isfinite(float(step(state, batch)[1]["loss"]))


class BnNet(nn.Module):
  width: int = 16

  @nn.compact
  def __call__(self, x, *, train=False):
    h = nn.BatchNorm(use_running_average=not train, name="bn")(nn.Dense(self.width, name="body")(x))
    return nn.Dense(3, name="head")(nn.relu(h))


def _linen_variables(width=16, drop=None, collections=("params", "batch_stats")):
  variables = BnNet(width).init(jax.random.PRNGKey(0), jnp.ones((1, 8)))
  params = {k: v for k, v in variables["params"].items() if k != drop}
  return {c: params if c == "params" else variables[c] for c in collections}


@pytest.mark.parametrize("variables, expected", [
    (_linen_variables(width=32), r'BnNet: the variables do not fit the module: For parameter '
     r'"kernel" in "/body".*shape \(8, 16\).*shape \(8, 32\)\. The variables must be this '
     r"module's: from module\.init"),
    (_linen_variables(drop="body"), r'Could not find parameter named "kernel" in scope '
     r'"/body"\. The variables must be this module\'s, every layer'),
    (_linen_variables(collections=("params",)), r'from collection "batch_stats" in "/bn".*'
     r"Pass the full variables dict \({'params': \.\.\., 'batch_stats': \.\.\.}"),
], ids=["other shapes", "a layer missing", "no batch_stats"])
def test_fit_explains_linen_variables_that_do_not_fit_the_module(variables, expected):
  labels = jtl.label_params(variables["params"], [("head/.*", "head"), (".*", "frozen")])
  batch = _batch(np.arange(8) % 3)
  for eval_batches in (None, lambda: [{**batch, "mask": np.ones(8, bool)}]):
    with pytest.raises(StepError, match=expected) as error:
      jtl.train.fit(module=BnNet(), variables=variables, labels=labels,
                    tx=jtl.make_optimizer(labels), train_batches=lambda start: iter([batch] * 2),
                    num_steps=1, progress=False, eval_batches=eval_batches)
    assert "https://" not in str(error.value)


def test_fit_takes_the_batches_its_step_takes():
  # A batch_transform builds the keys the step reads; a custom loss with a mask needs no label.
  apply_fn = lambda params, x: x @ params["w"]  # noqa: E731
  labels, tx = {"w": "all"}, optax.sgd(0.1)
  def rename(state, batch, rng):
    return {"inputs": batch["image"], "label": batch["labels"]}, {}
  raw = {"image": np.ones((8, 4), np.float32), "labels": np.arange(8) % 3}
  unlabeled = {"inputs": np.ones((8, 4), np.float32), "mask": np.ones(8, bool)}
  squared = lambda outputs, batch: jnp.mean((outputs - 1.0) ** 2)  # noqa: E731
  for kwargs, batch, loss in ((dict(batch_transform=rename), raw, np.log(3.0)),
                              (dict(loss_fn=squared), unlabeled, 1.0)):
    logged = []
    jtl.train.fit(module=apply_fn, variables={"params": {"w": jnp.zeros((4, 3))}},
                  labels=labels, tx=tx, train_batches=lambda s: iter([batch] * 2), num_steps=1,
                  progress=False, log_every=1, on_log=lambda step, m: logged.append(m), **kwargs)
    np.testing.assert_allclose(logged[0]["loss"], loss, rtol=1e-6)
