"""`jtl.recipes.selection.select_backbone`: the cached probe on each candidate,
the best on validation wins; the budget skips what does not fit."""

import jax
import numpy as np
import optax

from jtl.recipes import selection
from jtl.recipes.strategies import features
from own_model_pkg.candidates import Backbone


def batches(n: int, seed: int) -> list[dict[str, np.ndarray]]:
  """3 colour classes, 16 px, batches of 8 (the test devices); the last padded and masked."""
  rng = np.random.default_rng(seed)
  y = np.arange(n) % 3
  x = rng.uniform(0, 0.25, (n, 16, 16, 3)).astype(np.float32)
  x[np.arange(n), :, :, y] += 0.7
  out = []
  for i in range(0, n, 8):
    xb, yb = x[i:i + 8], y[i:i + 8]
    mask = np.arange(8) < len(yb)
    out.append({"inputs": np.resize(xb, (8, 16, 16, 3)), "label": np.resize(yb, 8),
                "mask": mask})
  return out


def candidate(name: str, blind: bool, loads: list | None = None, **kw) -> selection.Candidate:
  def load():
    if loads is not None:
      loads.append(name)
    module = Backbone(num_classes=3, blind=blind)
    return module, module.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32))
  return selection.Candidate(name, load, lambda: batches(48, 0), lambda: batches(21, 1), **kw)


def adam(labels):
  return optax.adam(3e-2)


def test_the_candidate_whose_probe_scores_best_on_validation_wins():
  chosen = selection.select_backbone(
      [candidate("blind", True), candidate("colour", False),
       candidate("absent", False, skip="its weights are not installed"),
       candidate("colour_again", False)],
      head_tx=adam, head_steps=40, batch_size=16, num_images=69)
  rows = {r.name: r for r in chosen.rows}
  # A tie goes to the earlier candidate (list the cheaper first).
  assert rows["colour"].val_accuracy == rows["colour_again"].val_accuracy == 1.0
  assert chosen.choice == "colour"
  # Constant features: one class for every image, 7 of the 21.
  assert rows["blind"].val_accuracy == 7 / 21
  assert rows["colour"].params == rows["blind"].params == 3 * 3 * 3 * 4 + 4 + 7 * 3 + 3
  assert rows["colour"].ms_per_image > 0 and rows["colour"].feature_seconds > 0
  assert rows["absent"].val_accuracy is None and "not installed" in rows["absent"].note
  table = chosen.markdown()
  assert "| colour | 1.0000 |" in table and "| chosen |" in table
  assert chosen.to_dict()["choice"] == "colour"
  assert "train_features" not in chosen.to_dict()


def test_the_choice_hands_on_its_training_features():
  blind, colour = candidate("blind", True), candidate("colour", False)
  chosen = selection.select_backbone(
      [blind, colour, candidate("blind_again", True)],  # a later, worse candidate
      head_tx=adam, head_steps=5, batch_size=16, num_images=69)
  assert chosen.choice == "colour"
  # What the run's cached probe would extract over the same pass (padding dropped).
  expected = features.extract_features(*colour.load(), colour.train_pass())
  assert chosen.train_features[0].shape == (48, 7)
  for got, want in zip(chosen.train_features, expected):
    np.testing.assert_array_equal(got, want)


def test_a_candidate_that_does_not_fit_the_budget_is_skipped():
  now = [0.0]
  loads = []

  def slow(name, blind):  # each load takes 100 s of the test's clock
    c = candidate(name, blind, loads)
    return selection.Candidate(name, lambda: (now.__setitem__(0, now[0] + 100), c.load())[1],
                               c.train_pass, c.val_pass)

  lines = []
  chosen = selection.select_backbone([slow("blind", True), slow("colour", False)],
                                     head_tx=adam, head_steps=10, batch_size=16, num_images=69,
                                     budget_seconds=150, clock=lambda: now[0], log=lines.append)
  # The first fits (100 s of 150); the second would end at 200 s: skipped, though better.
  assert chosen.choice == "blind" and loads == ["blind", "colour"]
  assert chosen.rows[1].val_accuracy is None
  assert "does not fit the 0s left of the time budget" in chosen.rows[1].note
  assert lines[1].startswith("colour: skipped")
  none = selection.select_backbone([slow("colour", False)], head_tx=adam, head_steps=10,
                                   batch_size=16, num_images=69, budget_seconds=50,
                                   clock=lambda: now[0])
  assert none.choice is None and "skipped" in none.rows[0].note
  assert none.train_features is None
