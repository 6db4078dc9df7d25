"""MovieLens as cold-start item examples (jtl.data.ratings) and soft labels
through the pipeline, on a small copy in recbole's file layout."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from jtl.data import make_dataset, ratings, sources
from jtl.errors import DataError

ITEMS = [("1", "Toy Story", "1995", "Animation Children's Comedy"),
         ("2", "GoldenEye", "1995", "Action Adventure Thriller"),
         ("3", "Four Rooms", "1995", "Thriller"),
         ("4", "Get Shorty", "1995", "Action Comedy Drama")]


@pytest.fixture
def ml_dir(tmp_path):
  rows = [("user_id:token", "item_id:token", "rating:float", "timestamp:float")]
  rng = np.random.default_rng(0)
  for item in range(1, 41):
    for user in range(1, 6):
      rows.append((str(user), str(item), str(int(rng.integers(1, 6))), "0"))
  rows.append(("6", "41", "2", "0"))  # item 41: nobody liked it
  (tmp_path / "ml-100k.inter").write_text("\n".join("\t".join(r) for r in rows) + "\n")
  items = [("item_id:token", "movie_title:token_seq", "release_year:token", "class:token_seq")]
  items += [(str(i), f"Movie {i}", "1990", "Drama") for i in range(1, 42)]
  items[1:5] = ITEMS
  (tmp_path / "ml-100k.item").write_text("\n".join("\t".join(r) for r in items) + "\n")
  return tmp_path, rows[1:]


def test_movielens_split_by_item(ml_dir):
  folder, rows = ml_dir
  data = ratings.movielens100k(folder)
  assert data.user_ids == ["1", "2", "3", "4", "5", "6"]
  texts = np.concatenate([data.texts[s] for s in ("train", "validation", "test")])
  assert len(texts) == len(set(texts)) == sum(
      any(r[1] == str(i) and int(r[2]) >= 4 for r in rows) for i in range(1, 42))
  assert "Toy Story (1995). Animation, Children's, Comedy" in texts
  assert min(len(data.texts[s]) for s in data.texts) > 0
  for split in data.texts:
    np.testing.assert_allclose(data.labels[split].sum(1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(data.labels[split] > 0, data.liked[split] > 0)
  # Toy Story's fans are exactly its ratings of 4 and 5, wherever it landed.
  split = next(s for s in data.texts if any(t.startswith("Toy Story") for t in data.texts[s]))
  row = [t.startswith("Toy Story") for t in data.texts[split]].index(True)
  fans = sorted(int(r[0]) - 1 for r in rows if r[1] == "1" and int(r[2]) >= 4)
  assert fans and np.flatnonzero(data.liked[split][row]).tolist() == fans


def test_recall_at_k():
  liked = np.array([[1, 1, 0, 0], [0, 0, 0, 1]], np.float32)
  scores = np.array([[4, 1, 3, 2], [4, 3, 2, 1]], np.float32)
  assert ratings.recall_at_k(scores, liked, k=1) == 0.5  # (1/1 + 0/1) / 2
  assert ratings.recall_at_k(scores, liked, k=3) == 0.25  # (1/2 + 0/1) / 2
  assert ratings.recall_at_k(scores, liked, k=4) == 1.0
  with pytest.raises(DataError, match="shape"):
    ratings.recall_at_k(scores[:1], liked, k=1)


def test_soft_labels_through_the_pipeline():
  soft = np.array([[0.5, 0.5, 0], [0, 0, 1], [0.25, 0.25, 0.5]], np.float32)
  data = {"train": {"text": np.array(["a", "b", "c"]), "label": soft}}
  assert sources.dataset_info(data).num_classes == 3
  batches = list(make_dataset(data, split="train", batch_size=2, train=False, max_length=8))
  assert batches[0]["label"].dtype == np.float32
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[:3], soft)
  bad = {"train": {"text": np.array(["a"]), "label": np.array([[0.5, 0.2]], np.float32)}}
  with pytest.raises(DataError, match="not distributions"):
    sources.dataset_info(bad)


@pytest.mark.skipif(importlib.util.find_spec("recbole") is None,
                    reason="recbole not installed (make setup installs it)")
def test_recboles_movielens():
  info = sources.dataset_info("movielens100k")
  assert info.num_classes == 943
  assert info.num_examples == {"train": 1025, "validation": 149, "test": 273}


def test_a_film_under_two_ids_lands_in_one_split(tmp_path):
  # Chasing Amy is items 246 and 268 of ML-100K; here 20 films each listed twice.
  items = [("item_id:token", "movie_title:token_seq", "release_year:token", "class:token_seq")]
  rows = [("user_id:token", "item_id:token", "rating:float", "timestamp:float")]
  for film in range(20):
    for item, spaces in ((2 * film + 1, " "), (2 * film + 2, "  ")):
      items.append((str(item), f"Film{spaces}{film}", "1997", "Drama"))
      rows.append(("1", str(item), "5", "0"))
  (tmp_path / "ml-100k.item").write_text("\n".join("\t".join(r) for r in items) + "\n")
  (tmp_path / "ml-100k.inter").write_text("\n".join("\t".join(r) for r in rows) + "\n")
  data = ratings.movielens100k(tmp_path)
  keys = {s: {" ".join(t.split()) for t in data.texts[s]} for s in data.texts}
  assert sum(len(k) for k in keys.values()) == 20
  assert not (keys["train"] & keys["test"] or keys["train"] & keys["validation"]
              or keys["validation"] & keys["test"])
