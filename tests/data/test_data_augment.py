"""RandAugment and CutMix in the tf.data pipeline: deterministic per (seed,
step), CutMix labels mixed by the pasted area, m = 0 / n = 0 the identity."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from jtl.data import augment, make_dataset
from jtl.errors import DataError


def _arrays(n: int = 16, size: int = 16, classes: int = 4) -> dict:
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  return {"train": {"image": images, "label": np.arange(n) % classes}}


def _batches(k: int, **kw) -> list[dict]:
  args = dict(split="train", batch_size=4, train=True, image_size=16, seed=3,
              normalize="none", flip=True, crop_scale=(0.5, 1.0))
  args.update(kw)
  it = make_dataset(_arrays(), **args)
  return [next(it) for _ in range(k)]


def test_randaugment_and_cutmix_are_deterministic_per_seed_and_step_and_resume():
  kw = dict(randaugment=(2, 9.0), cutmix_alpha=1.0, mixup_alpha=0.4)
  a, b = _batches(4, **kw), _batches(4, **kw)
  for x, y in zip(a, b):  # the same batches twice: identical
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
    np.testing.assert_array_equal(x["label"], y["label"])
  resumed = _batches(2, start_step=2, **kw)  # exact resume from step 2
  for x, y in zip(a[2:], resumed):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
    np.testing.assert_array_equal(x["label"], y["label"])
  other = _batches(1, **{**kw, "seed": 4})[0]
  assert np.abs(other["inputs"] - a[0]["inputs"]).max() > 1
  plain = _batches(1, randaugment=None, cutmix_alpha=1.0, mixup_alpha=0.4)[0]
  assert np.abs(plain["inputs"] - a[0]["inputs"]).max() > 1  # RandAugment did something


def test_cutmix_mixes_labels_by_the_pasted_area():
  n, size, classes = 4, 12, 4
  inputs = tf.constant(np.arange(n, dtype=np.float32)[:, None, None, None]
                       * np.ones((1, size, size, 3), np.float32))
  batch = {"inputs": inputs, "label": tf.range(n), "mask": tf.ones([n], tf.bool)}
  fractions = []
  for s in range(8):
    out = augment.cutmix(batch, tf.constant([s, 7], tf.int64), alpha=1.0,
                         num_classes=classes)
    x, label = out["inputs"].numpy(), out["label"].numpy()
    for i in range(n):
      partner = n - 1 - i  # the batch reversed
      pasted = float(np.mean(x[i, :, :, 0] == partner))
      if i == partner:
        continue
      assert set(np.unique(x[i])) <= {float(i), float(partner)}
      np.testing.assert_allclose(label[i, partner], pasted, atol=1e-6)
      np.testing.assert_allclose(label[i, i], 1 - pasted, atol=1e-6)
      fractions.append(pasted)
    np.testing.assert_allclose(label.sum(1), 1.0, rtol=1e-6)
  assert 0 < max(fractions) and min(fractions) < 1 and len(set(fractions)) > 2


def test_randaugment_at_zero_magnitude_or_zero_ops_is_the_identity():
  image = tf.constant(np.random.default_rng(1).uniform(0, 255, (10, 12, 3)), tf.float32)
  for name in sorted(augment.OPS):
    for sign in (1.0, -1.0):
      np.testing.assert_array_equal(augment.apply_op(name, image, 0.0, sign).numpy(),
                                    image.numpy(), err_msg=name)
    changed = augment.apply_op(name, image, 9.0, 1.0).numpy()
    assert np.abs(changed - image.numpy()).max() > 1.0, name  # each op does something
  seed = tf.constant([5, 6], tf.int64)
  np.testing.assert_array_equal(augment.randaugment(image, seed, n=3, m=0.0), image)
  np.testing.assert_array_equal(augment.randaugment(image, seed, n=0, m=9.0), image)
  # Through the pipeline: randaugment (0, m) and (n, 0) give the plain batches exactly.
  plain = _batches(2)
  for kw in ({"randaugment": (0, 9.0)}, {"randaugment": (2, 0.0)}):
    for x, y in zip(plain, _batches(2, **kw)):
      np.testing.assert_array_equal(x["inputs"], y["inputs"])


def test_bad_augmentation_options_are_one_data_error():
  with pytest.raises(DataError, match=r"(?s)cutmix_alpha=-1.*randaugment=\(2, 40\.0\)"):
    _batches(1, cutmix_alpha=-1, randaugment=(2, 40.0))
  with pytest.raises(DataError, match="randaugment=\\(1.5, 9\\)"):
    _batches(1, randaugment=(1.5, 9))


def test_evaluation_batches_are_never_mixed():
  """CutMix and mixup are training augmentations: an evaluation pass with
  them on is the plain pass (integer labels, the same pixels)."""
  kw = dict(split="train", batch_size=4, train=False, image_size=16, normalize="none")
  plain = list(make_dataset(_arrays(), **kw))
  mixed = list(make_dataset(_arrays(), cutmix_alpha=1.0, mixup_alpha=0.4, **kw))
  assert len(plain) == len(mixed) == 4
  for x, y in zip(plain, mixed):
    assert y["label"].ndim == 1
    np.testing.assert_array_equal(x["label"], y["label"])
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
