"""Every model API through the same calls: a Linen module, its NNX twin and a
plain apply function train to the same params (issue 13)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from models_for_tests import ConvNet, batch, init

import jtl

STEPS = 3
# The head and the last conv block train; the first two blocks (and their
# BatchNorm statistics) stay frozen.
RULES = [(r"(head|backbone_conv2|backbone_bn2)/.*", "top"), (r".*", "frozen")]


class NnxConvNet(nnx.Module):
  """models_for_tests.ConvNet written in NNX, with the same variable names."""

  def __init__(self, num_classes=10, width=8, dropout=0.0, *, rngs):
    channels = 3
    for i in range(3):
      out = width * (i + 1)
      setattr(self, f"backbone_conv{i}", nnx.Conv(channels, out, (3, 3), strides=2 if i else 1,
                                                  rngs=rngs))
      setattr(self, f"backbone_bn{i}", nnx.BatchNorm(out, momentum=0.9, rngs=rngs))
      channels = out
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.head = nnx.Linear(channels, num_classes, rngs=rngs)

  def features(self, x):
    for i in range(3):
      x = nnx.relu(getattr(self, f"backbone_bn{i}")(getattr(self, f"backbone_conv{i}")(x)))
    return jnp.mean(x, axis=(1, 2))

  def __call__(self, x):
    return self.head(self.dropout(self.features(x)))


def twins():
  """(Linen module, its variables, NNX module holding the same weights)."""
  linen = ConvNet(width=8)
  variables = init(linen, batch(16)["inputs"])
  variables = jax.tree.map(lambda x: x + 0.01, variables)  # BN stats away from 0/1
  model = NnxConvNet(width=8, rngs=nnx.Rngs(0))
  jtl.update_module(model, {"params": variables["params"], "state": variables["batch_stats"]})
  return linen, variables, model


def batches():
  return [jax.tree.map(np.asarray, batch(16, seed=i)) for i in range(STEPS)]


def train(model, variables, *, devices=None, pmap=False):
  labels = jtl.label_params(variables["params"], RULES)
  tx = jtl.make_optimizer(labels, learning_rate=0.05, optimizer="adamw", clip_norm=1.0)
  state = jtl.create_train_state(variables, labels, tx)
  if pmap:
    step = jtl.parallel.pmap_train_step(jtl.make_train_step(model, tx, labels=labels, axis_name="batch"))
    state = jtl.parallel.replicate(state)
    for b in batches():
      state, _ = step(state, jtl.parallel.shard_for_pmap(b))
    return jax.device_get(jtl.parallel.unreplicate(state))
  mesh = jtl.make_mesh(devices)
  state = jtl.place_state(state, mesh)
  step = jtl.jit_train_step(jtl.make_train_step(model, tx, labels=labels), mesh)
  for b in batches():
    state, _ = step(state, jtl.shard_batch(b, mesh))
  return jax.device_get(state)


def assert_close(a, b, atol):
  for path, x in jtl.tree.flatten(a).items():
    np.testing.assert_allclose(x, jtl.tree.flatten(b)[path], atol=atol, err_msg=path)


@pytest.mark.parametrize("where", ["1 device", "8 devices", "pmap"])
def test_linen_and_nnx_twins_end_with_the_same_params(where):
  linen, variables, model = twins()
  nnx_variables = jtl.adapter.variables_of(model)
  assert set(jtl.tree.flatten(nnx_variables["params"])) == set(jtl.tree.flatten(variables["params"]))
  kwargs = {"1 device": dict(devices=jax.devices()[:1]), "8 devices": {},
            "pmap": dict(pmap=True)}[where]
  a = train(linen, variables, **kwargs)
  b = train(model, nnx_variables, **kwargs)
  # Tolerance: the two APIs lower to the same ops; only fusion order differs.
  assert_close(a.params, b.params, atol=1e-5)
  assert_close(a.model_state["batch_stats"], b.model_state["state"], atol=1e-5)
  # Frozen layers and their statistics did not move; the trained ones did.
  np.testing.assert_array_equal(b.params["backbone_conv0"]["kernel"],
                                nnx_variables["params"]["backbone_conv0"]["kernel"])
  np.testing.assert_allclose(b.model_state["state"]["backbone_bn0"]["mean"],  # pmean rounding
                             nnx_variables["state"]["backbone_bn0"]["mean"], rtol=1e-6)
  assert not np.allclose(b.model_state["state"]["backbone_bn2"]["mean"],
                         nnx_variables["state"]["backbone_bn2"]["mean"])


def test_nnx_module_directly_and_written_back():
  _, _, model = twins()
  labels = jtl.label_params(model, RULES)  # the module itself, not its variables
  tx = jtl.make_optimizer(labels, learning_rate=0.05)
  state = jtl.create_train_state(model, labels, tx)
  step = jax.jit(jtl.make_train_step(model, tx, labels=labels))
  for b in batches():
    state, metrics = step(state, b)
  assert np.isfinite(metrics["loss"]) and 0.0 <= metrics["accuracy"] <= 1.0
  x = batches()[0]["inputs"]
  expected = jtl.make_eval_step(model)(state.variables, {**batches()[0], "mask": np.ones(16)})
  jtl.update_module(model, state)
  model.eval()
  logits = model(x)
  losses = jtl.losses.per_example_cross_entropy(logits, batches()[0]["label"])
  np.testing.assert_allclose(float(jnp.sum(losses)), expected["loss"], rtol=1e-5)
  np.testing.assert_array_equal(model.head.kernel[...], state.params["head"]["kernel"])


def test_dropout_keys_come_from_the_train_state():
  model = NnxConvNet(width=8, dropout=0.5, rngs=nnx.Rngs(0, dropout=1))
  labels = jtl.label_params(model, [(".*", "all")])
  tx = jtl.make_optimizer(labels, learning_rate=0.05)
  step = jax.jit(jtl.make_train_step(model, tx, labels=labels))
  b = batches()[0]
  runs = [step(jtl.create_train_state(model, labels, tx, rng=seed), b)[1]["loss"]
          for seed in (0, 0, 1)]
  assert runs[0] == runs[1] and runs[0] != runs[2]


def test_plain_apply_function_matches_linen():
  linen, variables, _ = twins()
  stats = variables["batch_stats"]

  def apply_fn(params, x, train=False):  # code without modules: stored BN statistics
    del train
    return linen.apply({"params": params, "batch_stats": stats}, x, train=False)

  labels = jtl.label_params(variables["params"], RULES)
  tx = jtl.make_optimizer(labels, learning_rate=0.05, optimizer="sgd")
  in_eval_mode = jtl.LinenModel(linen, call=lambda m, x, train: m(x, train=False))
  ref_step = jax.jit(jtl.make_train_step(in_eval_mode, tx, labels=labels))
  fn_step = jax.jit(jtl.make_train_step(jtl.FunctionModel(apply_fn, train_kwarg="train"), tx,
                                        labels=labels))
  a = jtl.create_train_state(variables, labels, tx)
  b = jtl.create_train_state({"params": variables["params"]}, labels, tx)
  for x in batches():
    a, ma = ref_step(a, x)
    b, mb = fn_step(b, x)
  assert_close(a.params, b.params, atol=1e-6)
  np.testing.assert_allclose(ma["grad_norm"], mb["grad_norm"], rtol=1e-5)
  assert not np.allclose(b.params["head"]["kernel"], variables["params"]["head"]["kernel"])


def _flops(fn, *args):
  return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


@pytest.mark.parametrize("kind", ["nnx", "function"])
def test_frozen_backbone_step_costs_about_a_forward(kind):
  b = batch(32, size=32)
  linen = ConvNet(width=32)
  variables = init(linen, b["inputs"])
  if kind == "nnx":
    model = NnxConvNet(width=32, rngs=nnx.Rngs(0))
    variables = jtl.adapter.variables_of(model)
    forward = lambda v, x: jtl.as_model(model).apply(v["params"], v, x, train=False, rng=None)[0]
  else:
    stats = variables["batch_stats"]
    model = lambda p, x: linen.apply({"params": p, "batch_stats": stats}, x)
    variables = {"params": variables["params"]}
    forward = lambda v, x: model(v["params"], x)
  labels = jtl.label_params(variables["params"], [("head/.*", "head"), (".*", "frozen")])
  tx = jtl.make_optimizer(labels, learning_rate=0.1, optimizer="adamw", clip_norm=1.0,
                          weight_decay=1e-4)
  state = jtl.create_train_state(variables, labels, tx)
  frozen_step = _flops(jtl.make_train_step(model, tx, labels=labels), state, b)
  all_labels = jtl.label_params(variables["params"], [(".*", "all")])
  full_tx = jtl.make_optimizer(all_labels, learning_rate=0.1, clip_norm=1.0)
  full_step = _flops(jtl.make_train_step(model, full_tx, labels=all_labels),
                     jtl.create_train_state(variables, all_labels, full_tx), b)
  fwd = _flops(forward, variables, b["inputs"])
  assert frozen_step <= 1.3 * fwd, frozen_step / fwd
  assert full_step >= 2.0 * fwd, full_step / fwd


def test_fit_checkpoints_and_resumes_an_nnx_model(tmp_path):
  _, _, model = twins()
  labels = jtl.label_params(model, RULES)
  tx = jtl.make_optimizer(labels, learning_rate=0.05)
  data = lambda start: iter(batches()[start:] + batches())
  kwargs = dict(module=model, variables=jtl.adapter.variables_of(model), labels=labels, tx=tx,
                train_batches=data, progress=False, async_checkpoints=False)
  straight = jtl.train.fit(num_steps=3, **kwargs).state
  jtl.train.fit(num_steps=2, workdir=tmp_path, checkpoint_every=1, **kwargs)
  resumed = jtl.train.fit(num_steps=3, workdir=tmp_path, checkpoint_every=1, **kwargs)
  assert resumed.start_step == 2
  assert_close(jax.device_get(straight.variables), jax.device_get(resumed.state.variables),
               atol=1e-6)
  variables, _ = jtl.restore_variables(tmp_path)
  assert set(variables) == {"params", "state"}


def test_lora_on_nnx_layers_trains_adapters_saves_and_merges(tmp_path):
  from jtl.recipes.strategies import lora
  _, _, model = twins()
  assert "head" in lora.adaptable_layers(model) and "backbone_conv2" in lora.adaptable_layers(model)
  variables = lora.add_lora(model, targets=r"head|backbone_conv2", rank=2)
  labels = jtl.label_params(variables["params"], lora.lora_rules(head_pattern=None))
  tx = jtl.make_optimizer(labels, learning_rate=0.05)
  adapted = lora.LoraWeights(model, alpha=4.0)
  eval_step = jax.jit(jtl.make_eval_step(adapted))
  b = {**batches()[0], "mask": np.ones(16)}
  np.testing.assert_allclose(eval_step(variables, b)["loss"],  # B = 0: the pretrained model
                             jtl.make_eval_step(model)(jtl.adapter.variables_of(model), b)["loss"],
                             rtol=1e-6)
  state = jtl.create_train_state(variables, labels, tx)
  step = jax.jit(jtl.make_train_step(adapted, tx, labels=labels))
  for x in batches():
    state, _ = step(state, x)
  trained = jax.device_get(state.params)
  np.testing.assert_array_equal(trained["head"]["kernel"], variables["params"]["head"]["kernel"])
  assert np.abs(trained["head"]["lora_b"]).sum() > 0
  # Adapters alone, saved and loaded onto fresh adapter slots: the same model.
  lora.save_adapters(trained, tmp_path / "adapters.safetensors", alpha=4.0, include=None)
  fresh = lora.add_lora(model, targets=r"head|backbone_conv2", rank=2, seed=5)["params"]
  loaded, alpha = lora.load_adapters(fresh, tmp_path / "adapters.safetensors")
  assert alpha == 4.0
  expected = eval_step(state.variables, b)["loss"]
  np.testing.assert_allclose(eval_step({**state.variables, "params": loaded}, b)["loss"],
                             expected, rtol=1e-6)
  # Merged into the kernels and written back: a plain NNX module, same outputs.
  jtl.update_module(model, {"params": lora.merge_lora(trained, 4.0),
                            "state": state.model_state["state"]})
  np.testing.assert_allclose(
      jtl.make_eval_step(model)(jtl.adapter.variables_of(model), b)["loss"], expected, rtol=1e-5)


def test_nnx_lora_layers_a_user_already_has_are_selected_by_rules():
  model = nnx.Sequential(nnx.LoRALinear(8, 16, lora_rank=2, rngs=nnx.Rngs(0)), nnx.relu,
                         nnx.Linear(16, 4, rngs=nnx.Rngs(1)))
  labels = jtl.label_params(model, [(r".*/lora_[ab]", "lora"), (r"layers/2/.*", "head"),
                                    (r".*", "frozen")])
  assert jtl.tree.flatten(labels) == {"layers/0/bias": "frozen", "layers/0/kernel": "frozen",
                                 "layers/0/lora/lora_a": "lora", "layers/0/lora/lora_b": "lora",
                                 "layers/2/bias": "head", "layers/2/kernel": "head"}
  tx = jtl.make_optimizer(labels, learning_rate=0.1)
  state = jtl.create_train_state(model, labels, tx)
  x = {"inputs": np.ones((4, 8), np.float32), "label": np.array([0, 1, 2, 3])}
  new, _ = jax.jit(jtl.make_train_step(model, tx, labels=labels))(state, x)
  np.testing.assert_array_equal(new.params["layers"][0]["kernel"],
                                state.params["layers"][0]["kernel"])
  assert not np.allclose(new.params["layers"][0]["lora"]["lora_b"],
                         state.params["layers"][0]["lora"]["lora_b"])


def test_linear_probe_on_cached_nnx_features_matches_the_module():
  from jtl.recipes import strategies
  _, _, model = twins()
  variables = jtl.adapter.variables_of(model)
  data = [{**b, "mask": np.ones(16, bool)} for b in batches()]
  feats, labels = strategies.extract_features(model, variables, data)
  assert feats.shape == (48, 24) and labels.shape == (48,)
  model.eval()
  np.testing.assert_allclose(feats[:16], model.features(data[0]["inputs"]), atol=1e-5)
  tx = jtl.make_optimizer({"head": {"kernel": "head", "bias": "head"}}, learning_rate=0.1)
  head = strategies.train_head(feats, labels, variables, tx, num_steps=5, batch_size=16)
  probed = strategies.with_head(variables, jax.device_get(head.params))
  assert not np.allclose(probed["params"]["head"]["kernel"], variables["params"]["head"]["kernel"])
  jtl.update_module(model, probed)
  logits = model(data[0]["inputs"])
  np.testing.assert_allclose(logits, feats[:16] @ probed["params"]["head"]["kernel"]
                             + probed["params"]["head"]["bias"], atol=1e-4)


def test_labels_from_nnx_state_are_those_of_the_module():
  """`label_params(nnx.state(model, nnx.Param), rules)` (and a tree.map over
  that state) give labels every call takes, as `label_params(model, rules)`."""
  _, _, model = twins()
  want = jtl.label_params(model, RULES)
  params = nnx.state(model, nnx.Param)
  from_state = jtl.label_params(params, RULES)
  mapped = jax.tree.map(lambda _: "frozen", params)  # a State of strings, built by hand
  assert from_state == want
  assert jtl.partition.as_labels(mapped) == jax.tree.map(lambda _: "frozen", want)
  as_state = jax.tree.map(lambda x: x, params)  # labels kept as an nnx.State
  nnx.replace_by_pure_dict(as_state, want)
  results = []
  for labels in (want, from_state, as_state):
    tx = jtl.make_optimizer(labels, learning_rate=0.05)
    state = jtl.create_train_state(model, labels, tx)
    step = jax.jit(jtl.make_train_step(model, tx, labels=labels))
    state, _ = step(state, batches()[0])
    results.append(jax.device_get(state.params))
  for other in results[1:]:
    assert_close(other, results[0], atol=0)
  assert jtl.partition.summarize(params, from_state).trainable_params == \
      jtl.partition.summarize(model, want).trainable_params


class TinyNnx(nnx.Module):
  """body (Linear + BatchNorm) and head; `width` changes the body's shapes."""

  def __init__(self, width=8, *, rngs):
    self.body = nnx.Linear(4, width, rngs=rngs)
    self.bn = nnx.BatchNorm(width, rngs=rngs)
    self.head = nnx.Linear(width, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.bn(self.body(x))))


def _fit_nnx(module, variables, starts=None):
  """fit on `variables`; `starts` collects the steps its batches were asked from."""
  def train_batches(start):
    (starts if starts is not None else []).append(start)
    return iter([{"inputs": np.ones((8, 4), np.float32), "label": np.zeros(8, np.int32)}] * 2)

  labels = jtl.label_params(variables["params"], [("head/.*", "head"), (".*", "frozen")],
                            warn_unused=False)
  return jtl.train.fit(module=module, variables=variables, labels=labels,
                       tx=jtl.make_optimizer(labels, learning_rate=0.1),
                       train_batches=train_batches, num_steps=1, progress=False)


def test_fit_refuses_variables_covering_part_of_an_nnx_module_before_a_step():
  # Only the head: the module's own random body and its statistics would train
  # unsaved; the error lists what is missing and says what to pass.
  head_only = {"params": {"head": jtl.adapter.variables_of(TinyNnx(rngs=nnx.Rngs(1)))
                          ["params"]["head"]}}
  starts = []
  with pytest.raises(jtl.errors.StepError) as error:
    _fit_nnx(TinyNnx(rngs=nnx.Rngs(0)), head_only, starts)
  assert starts == []  # refused before a batch was read
  message = str(error.value)
  assert message.startswith("fit(module=TinyNnx, variables=...): the variables do not fit")
  for missing in ("params/body/kernel (4, 8)", "params/bn/scale (8,)", "state/bn/mean (8,)"):
    assert f"  - {missing}\n" in message
  assert "params/head" not in message and "variables=None" in message
  assert "jtl.adapter.variables_of(module)" in message


def test_fit_refuses_another_nnx_modules_variables_naming_both_shapes():
  other = jtl.adapter.variables_of(TinyNnx(width=16, rngs=nnx.Rngs(0)))
  other["params"]["extra"] = {"kernel": np.zeros((2, 2), np.float32)}
  with pytest.raises(jtl.errors.StepError) as error:
    _fit_nnx(TinyNnx(rngs=nnx.Rngs(0)), other)
  message = str(error.value)
  for shapes in ("params/body/kernel: (4, 16) in the variables, (4, 8) in the module",
                 "params/head/kernel: (16, 3) in the variables, (8, 3) in the module",
                 "state/bn/var: (16,) in the variables, (8,) in the module"):
    assert shapes in message
  assert "Not in the module (1):\n  - params/extra/kernel (2, 2)" in message


def test_update_module_refuses_unknown_and_misshaped_paths_and_writes_nothing():
  module = TinyNnx(rngs=nnx.Rngs(0))
  before = jax.device_get(jtl.adapter.variables_of(module))
  wider = jtl.adapter.variables_of(TinyNnx(width=16, rngs=nnx.Rngs(1)))
  wider["batch_stats"] = wider["state"]
  with pytest.raises(jtl.errors.StepError) as error:
    jtl.update_module(module, wider)
  message = str(error.value)
  assert "params/body/kernel: (4, 16) in the variables, (4, 8) in the module" in message
  assert "  - batch_stats/bn/mean (16,)" in message and "under 'state'" in message
  # LoRA adapters left in the params: fold them in first, with merge_lora.
  lora = jtl.adapter.variables_of(TinyNnx(rngs=nnx.Rngs(1)))
  lora["params"]["head"].update(lora_a=np.zeros((8, 2), np.float32),
                                lora_b=np.zeros((2, 3), np.float32))
  with pytest.raises(jtl.errors.StepError,
                     match=r"(?s)params/head/lora_a \(8, 2\).*are LoRA adapters.*"
                           r"jtl\.recipes\.strategies\.merge_lora\(variables\[\"params\"\], "
                           r"alpha\)"):
    jtl.update_module(module, lora)
  assert_close(jtl.adapter.variables_of(module), before, atol=0)  # nothing was written
  # A partial update is one: params only, the statistics stay the module's.
  new = jtl.adapter.variables_of(TinyNnx(rngs=nnx.Rngs(2)))
  jtl.update_module(module, {"params": new["params"]})
  assert_close(jtl.adapter.variables_of(module), {**new, "state": before["state"]}, atol=0)


class SowingNnx(TinyNnx):
  """TinyNnx that sows its features (nnx.Intermediate) at each call."""

  def __call__(self, x):
    h = nnx.relu(self.bn(self.body(x)))
    self.sow(nnx.Intermediate, "feat", h)
    return self.head(h)


def _fit_all(module, variables, num_steps=4):
  """fit of every leaf (BatchNorm statistics included) on fixed batches."""
  rng = np.random.default_rng(0)
  data = [{"inputs": rng.normal(size=(8, 4)).astype(np.float32),
           "label": rng.integers(0, 3, 8).astype(np.int32)} for _ in range(num_steps)]
  labels = jtl.label_params(module, [(".*", "all")])
  return jtl.train.fit(module=module, variables=variables, labels=labels,
                       tx=jtl.make_optimizer(labels, learning_rate=0.1),
                       train_batches=lambda start: iter(data[start:]), num_steps=num_steps,
                       progress=False).state


@pytest.mark.filterwarnings("ignore:Using 'Module.sow\\(\\)' outside:DeprecationWarning")
def test_a_sowing_nnx_module_trains_as_the_same_module_without_the_sow():
  """Sown values are a call's outputs, not state: they were in the train
  step's new state but not in the module's, and the next step's merge failed
  (flax's 'key in pure_dict not available in state')."""
  plain = _fit_all(TinyNnx(rngs=nnx.Rngs(0)), None)
  sowing = _fit_all(SowingNnx(rngs=nnx.Rngs(0)), None)
  assert set(sowing.model_state["state"]) == {"bn"}
  assert_close(jax.device_get(sowing.variables), jax.device_get(plain.variables), atol=0)
  assert not np.allclose(plain.params["body"]["kernel"],
                         jtl.adapter.variables_of(TinyNnx(rngs=nnx.Rngs(0)))["params"]["body"]
                         ["kernel"])


@pytest.mark.filterwarnings("ignore:Using 'Module.sow\\(\\)' outside:DeprecationWarning")
def test_an_nnx_module_called_before_fit_keeps_its_sown_values_out_of_its_variables():
  module = SowingNnx(rngs=nnx.Rngs(0))
  before = jtl.adapter.variables_of(module)
  module(np.ones((2, 4), np.float32))  # sows "feat" (and moves its statistics: train mode)
  assert "feat" in nnx.to_pure_dict(nnx.state(module, nnx.Intermediate))
  assert set(jtl.adapter.variables_of(module)["state"]) == {"bn"}
  trained = _fit_all(module, before)  # variables from before the call: accepted
  plain = _fit_all(TinyNnx(rngs=nnx.Rngs(0)), None)
  assert_close(jax.device_get(trained.variables), jax.device_get(plain.variables), atol=0)
  jtl.update_module(module, trained)  # written back; the module still runs and sows
  assert_close(jtl.adapter.variables_of(module), jax.device_get(trained.variables), atol=0)
  assert module(np.ones((2, 4), np.float32)).shape == (2, 3)
  # Sown values given as variables: refused, saying what they are.
  sown = {**before, "state": {**before["state"], "feat": (np.ones((2, 8), np.float32),)}}
  for call in (lambda: jtl.update_module(module, sown), lambda: _fit_all(module, sown)):
    with pytest.raises(jtl.errors.StepError, match=r"(?s)Not in the module \(1\):\n  - "
                       r"state/feat/0 \(2, 8\).*are values the module sowed"):
      call()


class FlagNnx(nnx.Module):
  """The common NNX style: an optional mode flag passed on to the layers."""

  def __init__(self, rngs):
    self.body = nnx.Linear(4, 8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x, train: bool = False):
    return self.head(self.drop(self.bn(self.body(x), use_running_average=not train),
                               deterministic=not train))


def _losses(model, rules, variables, seeds=(0, 0, 1), evaluate=False):
  """(each seed's first-step training loss, the first seed's state, the
  evaluation loss when `evaluate`)."""
  labels = jtl.label_params(variables["params"], rules)
  tx = jtl.make_optimizer(labels, learning_rate=0.1)
  step = jax.jit(jtl.make_train_step(model, tx, labels=labels))
  runs = [step(jtl.create_train_state(variables, labels, tx, rng=s), SMALL) for s in seeds]
  state = runs[0][0]
  loss = float(jtl.make_eval_step(model)(state.variables, SMALL)["loss"]) if evaluate else None
  return [float(m["loss"]) for _, m in runs], state, loss


SMALL = {"inputs": np.linspace(-2, 2, 32, dtype=np.float32).reshape(8, 4),
         "label": np.arange(8) % 3, "mask": np.ones(8, bool)}


def test_the_mode_flag_a_call_takes_is_passed_and_frozen_statistics_stay():
  """An optional `train=False` was never passed: the module trained in its
  evaluation mode (BatchNorm statistics still, no dropout), silently. A
  frozen BatchNorm stays frozen though the call passes use_running_average."""
  model = FlagNnx(nnx.Rngs(0))
  variables = jtl.adapter.variables_of(model)
  assert jtl.NnxModel(model).train_kwarg == "train"
  assert jtl.NnxModel(model, train_kwarg=None).train_kwarg is None  # the opt-out
  (a, b, c), state, _ = _losses(model, [(".*", "all")], variables)
  assert a == b != c  # dropout on, its keys from the train state
  assert np.abs(state.model_state["state"]["bn"]["mean"]).min() > 0  # statistics moved
  # The head alone trains: the BatchNorm's statistics stay bit-identical.
  _, state, _ = _losses(model, [("head/.*", "head"), (".*", "frozen")], variables, seeds=(0,))
  np.testing.assert_array_equal(state.model_state["state"]["bn"]["mean"],
                                variables["state"]["bn"]["mean"])

  def apply_fn(params, x, train=False, rng=None):  # the same for an apply function
    h = x @ params["w"]
    return h * jax.random.bernoulli(rng, 0.5, h.shape) * 2 if train else h

  assert (jtl.FunctionModel(apply_fn).train_kwarg, jtl.FunctionModel(apply_fn).rng_kwarg) == (
      "train", "rng")
  (a, b, c), _, _ = _losses(apply_fn, [(".*", "w")], {"params": {"w": np.ones((4, 3),
                                                                                np.float32)}})
  assert a == b != c


def test_an_nnx_layer_given_its_key_at_call_time_gets_one_in_training():
  class CallRngs(nnx.Module):
    def __init__(self, rngs):
      self.body, self.drop = nnx.Linear(4, 3, rngs=rngs), nnx.Dropout(0.5)

    def __call__(self, x, rngs=None):
      return self.drop(self.body(x), rngs=rngs)

  class NoKey(CallRngs):
    def __call__(self, x):
      return self.drop(self.body(x))

  model = CallRngs(nnx.Rngs(0))
  variables = jtl.adapter.variables_of(model)
  assert jtl.NnxModel(model).rng_kwarg == "rngs"
  (a, b, c), _, ev = _losses(model, [(".*", "all")], variables, evaluate=True)
  assert a == b != c and np.isfinite(ev)  # evaluation: rngs=None, no dropout
  with pytest.raises(jtl.errors.StepError, match=r"NoKey: `deterministic` is False, but no "
                     r"`rngs` argument.*rng_kwarg names \(now None.*__call__ an `rngs=None`"):
    _losses(NoKey(nnx.Rngs(0)), [(".*", "all")], variables, seeds=(0,))


class NoisyLinen(nn.Module):
  """Draws from a stream of its own ("noise") besides dropout's, and counts
  its calls, in evaluation too."""
  in_eval: bool = False

  @nn.compact
  def __call__(self, x, *, train=False):
    h = nn.Dropout(0.5, deterministic=not train)(nn.Dense(8, name="body")(x))
    if train or self.in_eval:
      h = h + jax.random.normal(self.make_rng("noise"), h.shape)
    count = self.variable("counters", "calls", lambda: jnp.zeros((), jnp.int32))
    if not self.is_initializing():
      count.value += 1
    return nn.Dense(3, name="head")(h)


def test_linen_rng_streams_and_collections_updated_in_evaluation_are_options():
  """make_rng("noise") was flax's raw InvalidRngError, and a collection the
  module updates in evaluation its raw ModifyScopeVariableError."""
  x = SMALL["inputs"]
  variables = NoisyLinen().init(jax.random.PRNGKey(0), x)
  with pytest.raises(jtl.errors.StepError, match=r"NoisyLinen draws from the rng stream "
                     r"'noise'.*jtl.LinenModel\(module, rng_streams=\('dropout', 'noise'\)\)"):
    _losses(NoisyLinen(), [(".*", "all")], variables, seeds=(0,))
  with pytest.raises(jtl.errors.StepError, match=r"updates 'counters/calls' in evaluation.*"
                     r"jtl.LinenModel\(module, eval_mutable=\('counters',\)\)"):
    jtl.make_eval_step(NoisyLinen())(variables, SMALL)
  model = jtl.LinenModel(NoisyLinen(), rng_streams=("dropout", "noise"), eval_mutable="counters")
  (a, b, c), state, ev = _losses(model, [(".*", "all")], variables, evaluate=True)
  assert a == b != c and np.isfinite(ev)
  assert int(state.model_state["counters"]["calls"]) == 1  # training keeps its updates
  # Dropout's key is the step's key as before; each other stream folds it in.
  key = jax.random.PRNGKey(7)
  out, _ = model.apply(variables["params"], {"counters": variables["counters"]}, x, train=True,
                       rng=key)
  expected, _ = NoisyLinen().apply(variables, x, train=True, mutable=["counters"], rngs={
      "dropout": key, "noise": jax.random.fold_in(key, 1)})
  np.testing.assert_array_equal(out, expected)
  with pytest.raises(jtl.errors.StepError, match=r"'noise'.*in evaluation, where jtl passes "
                     "no random keys"):
    jtl.make_eval_step(jtl.LinenModel(NoisyLinen(in_eval=True), eval_mutable="counters"))(
        variables, SMALL)
