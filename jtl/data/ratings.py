"""Ratings for recommendation: MovieLens 100K as item-text examples.

MovieLens 100K (GroupLens; 100,000 ratings 1-5 of 1,682 movies by 943
users) is read from the copy the pip package recbole ships
(`recbole/dataset_example/ml-100k/`: `ml-100k.inter` user/item/rating,
`ml-100k.item` title, year and genres), by path: recbole itself (which
needs torch) is never imported; install it with `pip install --no-deps
recbole==1.2.1`.

The task is item cold-start: for a movie nobody has rated yet, rank the
users who will like it (rate it 4 or 5). An example is one movie: its input
the text "<title> (<year>). <genres>", its label the users who liked it, as a
distribution over the 943 users (1/k for each of its k fans: a soft label,
so the model's softmax over users is trained with the multinomial likelihood
of Mult-VAE, Liang et al. 2018). Movies are split by a hash of their title
and year (not their id: ML-100K lists some films under two ids, which must
not land on both sides): 20% "test", 10% "validation", the rest "train"; a
movie's ratings are all in its split, so the test movies are new to the model. Movies that nobody
liked have no label and are left out. `liked(split)` gives the 0/1 user x
movie matrix that `recall_at_k` scores a ranking against.

>>> scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.1]])
>>> round(recall_at_k(scores, np.array([[1, 0, 1], [1, 0, 0]]), k=1), 3)
0.5
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from jtl.data.text import package_file
from jtl.errors import DataError

MOVIELENS = "movielens100k"
LIKED_RATING = 4
_INSTALL = "pip install --no-deps recbole==1.2.1"
_SPLITS = (("test", 0.2), ("validation", 0.3))  # hash < 0.2: test; < 0.3: validation


class Ratings(NamedTuple):
  """Per split: movie texts, soft labels [N, users], liked 0/1 [N, users]."""
  texts: dict[str, np.ndarray]
  labels: dict[str, np.ndarray]
  liked: dict[str, np.ndarray]
  user_ids: list[str]


def split_key(title: str, year: str) -> str:
  """What a movie's split is drawn from: "title (year)", lower-cased, runs of
  spaces as one, so that a film listed under two ids lands in one split.

  >>> split_key(" Chasing  Amy ", "1997")
  'chasing amy (1997)'
  """
  return " ".join(f"{title} ({year})".lower().split())


def _split_of(key: str) -> str:
  digest = hashlib.md5(key.encode("utf-8")).digest()
  u = int.from_bytes(digest[:4], "big") / 2**32
  return next((name for name, upper in _SPLITS if u < upper), "train")


def _read_tsv(path: Path) -> list[dict[str, str]]:
  with open(path, encoding="utf-8", errors="replace", newline="") as f:
    rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
  if not rows:
    raise DataError(f"{path}: empty file.")
  header = [h.split(":")[0] for h in rows[0]]  # "user_id:token" -> "user_id"
  return [dict(zip(header, r)) for r in rows[1:] if r]


def item_texts(folder: Path) -> dict[str, str]:
  """{item id: "<title> (<year>). <genre>, <genre>"} from ml-100k.item."""
  return {item: text for item, (text, _) in _items(folder).items()}


def _items(folder: Path) -> dict[str, tuple[str, str]]:
  """{item id: (its text, its split_key)} from ml-100k.item."""
  out = {}
  for row in _read_tsv(folder / "ml-100k.item"):
    genres = ", ".join(row.get("class", "").split())
    title, year = row["movie_title"], row["release_year"]
    out[row["item_id"]] = (f"{title} ({year}). {genres}".strip(), split_key(title, year))
  return out


def movielens100k(folder: str | Path | None = None) -> Ratings:
  """MovieLens 100K as cold-start item examples (see the module docstring);
  `folder` defaults to recbole's copy."""
  if folder is None:
    folder = package_file("recbole", "dataset_example", "ml-100k", "ml-100k.inter",
                          install=_INSTALL).parent
  folder = Path(folder)
  items = _items(folder)
  rows = _read_tsv(folder / "ml-100k.inter")
  user_ids = sorted({r["user_id"] for r in rows}, key=int)
  user_index = {u: i for i, u in enumerate(user_ids)}
  fans: dict[str, set[int]] = {}
  for r in rows:
    if float(r["rating"]) >= LIKED_RATING:
      fans.setdefault(r["item_id"], set()).add(user_index[r["user_id"]])
  out: dict[str, dict[str, list]] = {s: {"texts": [], "liked": []} for s in
                                     ("train", "validation", "test")}
  for item in sorted(fans, key=int):
    if item not in items:
      raise DataError(f"{folder}: item {item} is rated but has no row in ml-100k.item.")
    row = np.zeros(len(user_ids), np.float32)
    row[sorted(fans[item])] = 1.0
    text, key = items[item]
    split = out[_split_of(key)]
    split["texts"].append(text)
    split["liked"].append(row)
  liked = {s: np.stack(d["liked"]) for s, d in out.items()}
  return Ratings({s: np.array(d["texts"], dtype=object) for s, d in out.items()},
                 {s: m / m.sum(1, keepdims=True) for s, m in liked.items()},
                 liked, user_ids)


def recall_at_k(scores: np.ndarray, liked: np.ndarray, k: int = 20) -> float:
  """Mean over items of |top-k users by score ∩ liked| / min(k, |liked|)."""
  if scores.shape != liked.shape:
    raise DataError(f"scores {scores.shape} and liked {liked.shape} differ in shape.")
  top = np.argsort(-scores, axis=1)[:, :k]
  hits = np.take_along_axis(liked, top, axis=1).sum(1)
  return float(np.mean(hits / np.maximum(np.minimum(k, liked.sum(1)), 1)))
