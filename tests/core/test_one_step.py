"""Every method runs through the one train step, so microbatches, pmap and the
mesh hold for each (issue 13)."""

import jax
import numpy as np
from models_for_tests import MLP, batch, init

import jtl
from jtl.recipes import adversarial, distill, domain


def mlp_setup(classes=4, seed=0):
  model = MLP(num_classes=classes)
  variables = init(model, batch(16, classes=classes)["inputs"], seed)
  labels = jtl.label_params(variables["params"], [(".*", "all")])
  tx = jtl.make_optimizer(labels, learning_rate=1e-2, optimizer="adam")
  return model, variables, labels, tx


def run(step, state, n=3, size=16):
  for i in range(n):
    state, metrics = step(state, jax.tree.map(np.asarray, batch(size, classes=4, seed=i)))
  return jax.device_get(state), jax.device_get(metrics)


def test_distillation_with_two_microbatches_equals_one():
  model, variables, labels, tx = mlp_setup()
  teacher_module, _, _, _ = mlp_setup()
  teacher = distill.teacher_fn(teacher_module, init(teacher_module, batch(2)["inputs"], seed=7))
  make = lambda mb: jax.jit(distill.make_distill_train_step(
      model, tx, labels=labels, temperature=2.0, alpha=0.5, teacher=teacher, microbatches=mb))
  state = jtl.create_train_state(variables, labels, tx)
  one, m1 = run(make(1), state)
  two, m2 = run(make(2), state)
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params)):
    np.testing.assert_allclose(a, b, atol=2e-6)  # tolerance: fp32 summation order
  np.testing.assert_allclose(m1["soft_loss"], m2["soft_loss"], rtol=1e-5)
  assert not np.allclose(one.params["head"]["kernel"], variables["params"]["head"]["kernel"])


def test_adversarial_step_under_pmap_equals_the_mesh_step():
  model, variables, labels, tx = mlp_setup()
  # No random start: each pmap shard would draw its own start from one key.
  kwargs = dict(labels=labels, attack="pgd", eps=0.1, steps=3, random_start=False,
                clean_fraction=0.25)
  mesh = jtl.make_mesh()
  state = jtl.create_train_state(variables, labels, tx)
  on_mesh = jtl.jit_train_step(adversarial.make_adversarial_train_step(model, tx, **kwargs), mesh)
  mesh_state, mesh_metrics = run(lambda s, b: on_mesh(s, jtl.shard_batch(b, mesh)),
                                 jtl.place_state(state, mesh))
  pmapped = jtl.parallel.pmap_train_step(adversarial.make_adversarial_train_step(
      model, tx, axis_name="batch", **kwargs))
  pmap_state, pmap_metrics = run(lambda s, b: pmapped(s, jtl.parallel.shard_for_pmap(b)),
                                 jtl.parallel.replicate(state))
  pmap_state, pmap_metrics = jtl.parallel.unreplicate((pmap_state, pmap_metrics))
  for a, b in zip(jax.tree.leaves(mesh_state.params), jax.tree.leaves(pmap_state.params)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  np.testing.assert_allclose(pmap_metrics["adv_accuracy"], mesh_metrics["adv_accuracy"],
                             atol=1e-6)
  np.testing.assert_allclose(pmap_metrics["loss"], mesh_metrics["loss"], rtol=1e-5)


def test_domain_adaptation_microbatches_keep_source_and_target_rows_paired():
  from beyond_models import TinyCNN, images
  from beyond_models import labels as class_labels
  model = TinyCNN(4)
  x, y = images(8), class_labels(8)
  tgt = images(8, seed=9, shift=1.5)
  module, variables = domain.wrap(model, init(model, x), x, method="dann", domain_hidden=16,
                                   domain_dropout=0.0)  # dropout draws differ per micro-batch
  labels = jtl.label_params(variables["params"], [(".*", "all")])
  tx = jtl.make_optimizer(labels, learning_rate=1e-2, optimizer="sgd")
  make = lambda mb: jax.jit(domain.make_adapt_train_step(
      module, tx, labels=labels, method="dann", grl_scale=0.5, microbatches=mb))
  state = jtl.create_train_state(variables, labels, tx)
  _, two = make(2)(state, {"inputs": x, "label": y, "target_inputs": tgt})
  # Micro-batch i must hold source rows i, i+2, ... with the same target rows.
  halves = [make(1)(state, {"inputs": x[s], "label": y[s], "target_inputs": tgt[s]})[1]
            for s in (slice(0, None, 2), slice(1, None, 2))]
  for key in ("loss", "class_loss", "adapt_loss"):
    np.testing.assert_allclose(two[key], np.mean([h[key] for h in halves]), rtol=1e-5)
