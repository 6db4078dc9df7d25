"""all-MiniLM-L6-v2 with its real weights against sentence-transformers."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from jtl import tree, weights
from jtl.data import text as data_text
from jtl.errors import ConfigError, DataError, LoadError
from jtl.models import bert, registry, text

REF = np.load(Path(__file__).parents[1] / "fixtures" / "minilm_reference.npz")
SENTENCES = [str(s) for s in REF["sentences"]]


@pytest.fixture(scope="module")
def minilm():
  """The real weights loaded strictly, and the model's outputs on the fixture sentences."""
  model = bert.Bert()
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), bert.example_input(1)))
  like = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  path = weights.resolve("minilm_l6/sentence")
  variables, report = weights.load_pretrained(path, like, converter=bert.convert_torch)
  batch = bert.preprocess_minilm(SENTENCES)
  embed = jax.jit(lambda v, b: model.apply(v, b, method=bert.Bert.embed))
  return model, variables, report, batch, embed


def test_real_weights_load_strictly(minilm):
  _, variables, report, _, _ = minilm
  assert report.ok and not report.adapted and not report.reinitialised
  assert len(report.loaded) == 5 + 6 * 16 + 2  # embeddings + 6 layers + the pooler
  assert variables["params"]["embeddings"]["word_embeddings"]["embedding"].shape == (30522, 384)


def test_tokens_match_the_hugging_face_tokenizer(minilm):
  batch = minilm[3]
  length = batch["input_ids"].shape[1]
  assert length == REF["input_ids"].shape[1]  # the longest sentence, after trimming
  np.testing.assert_array_equal(batch["input_ids"], REF["input_ids"])
  np.testing.assert_array_equal(batch["attention_mask"], REF["attention_mask"])


def test_embeddings_match_sentence_transformers(minilm):
  _, variables, _, batch, embed = minilm
  got = np.asarray(embed(variables, batch))
  want = REF["embeddings"]
  cosine = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
  assert (cosine >= 0.999).all(), cosine
  assert np.abs(got - want).max() < 1e-4
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, rtol=1e-5)


def test_paraphrases_score_higher_than_unrelated_pairs(minilm):
  _, variables, _, batch, embed = minilm
  e = np.asarray(embed(variables, batch))
  sim = e @ e.T
  # 0/1: eating food / eating bread; 2/3: movie awesome / film great.
  for a, b in ((0, 1), (2, 3)):
    unrelated = [sim[a, j] for j in range(len(e)) if j not in (a, b)]
    assert sim[a, b] > max(unrelated) + 0.2, (sim[a, b], unrelated)


def test_padding_and_token_types_do_not_change_the_embedding(minilm):
  model, variables, _, _, embed = minilm
  tokenizer = text.load_tokenizer(text.minilm_dir(), max_length=16)
  padded = text.tokenize(tokenizer, SENTENCES[:2])
  assert padded["input_ids"].shape == (2, 16)
  trimmed = text.trim_padding(padded)
  no_types = {k: v for k, v in padded.items() if k != "token_type_ids"}
  a = np.asarray(embed(variables, no_types))
  np.testing.assert_allclose(np.asarray(embed(variables, trimmed)), a, atol=1e-5)
  np.testing.assert_allclose(a, REF["embeddings"][:2], atol=1e-4)
  # rounded up to a multiple of 4 tokens (few batch shapes): the same embedding
  rounded = text.trim_padding(padded, multiple=4)
  width = trimmed["input_ids"].shape[1]
  assert rounded["input_ids"].shape[1] == -(-width // 4) * 4 > width
  np.testing.assert_allclose(np.asarray(embed(variables, rounded)), a, atol=1e-5)
  assert text.trim_padding(padded, multiple=64)["input_ids"].shape == (2, 16)  # never wider
  with pytest.raises(DataError, match="multiple=0"):
    text.trim_padding(padded, multiple=0)


def test_classification_head_on_pooled_features(minilm):
  _, variables, _, batch, _ = minilm
  model = bert.Bert(num_classes=2)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), bert.example_input(1)))
  like = jax.tree.map(lambda s: np.full(s.shape, 0.01, s.dtype), shapes)
  like["params"]["head"]["kernel"] = np.random.RandomState(0).normal(
      size=(384, 2)).astype(np.float32)
  path = weights.resolve("minilm_l6/sentence")
  clf, report = weights.load_pretrained(path, like, converter=bert.convert_torch,
                                           skip=[r"params/head/.*"])
  assert {e.path for e in report.skipped} == {"params/head/kernel", "params/head/bias"}

  @jax.jit
  def run(v, b):
    return model.apply(v, b), model.apply(v, b, method=bert.Bert.features)

  logits, feats = map(np.asarray, run(clf, batch))
  assert logits.shape == (6, 2) and logits.dtype == np.float32
  head = clf["params"]["head"]
  np.testing.assert_allclose(logits, feats @ head["kernel"] + head["bias"], rtol=1e-4, atol=1e-5)
  # The pooled features are the pretrained encoder's (before normalisation).
  unit = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
  np.testing.assert_allclose(unit, REF["embeddings"], atol=1e-4)


def test_dropout_only_in_training():
  model = bert.Bert(num_classes=2, config=bert.BertConfig(
      vocab_size=200, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16,
      max_position=8))
  batch = bert.example_input(2)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), batch))
  rng = np.random.RandomState(0)
  variables = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)

  @jax.jit
  def run(v, key):
    return model.apply(v, batch), model.apply(v, batch, train=True, rngs={"dropout": key})

  # An "rbg" key: XLA:CPU compiles threefry dropout masks several times slower.
  a, trained = map(np.asarray, run(variables, jax.random.key(1, impl="rbg")))
  assert np.abs(trained - a).max() > 1e-3


def test_spec_groups_cover_every_param():
  spec = registry.get_spec("minilm_l6")
  assert spec.pretrained == "minilm_l6/sentence" and spec.default_num_classes == 0
  assert [n for n, _ in spec.groups] == (
      ["embeddings"] + [f"layer_{i}" for i in range(6)] + ["pooler", "head"])
  model = spec.build(num_classes=3)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), spec.example_input(2)))
  patterns = [p for _, p in spec.groups]
  hit = [tree.first_match(p, patterns) for p in tree.flatten(shapes["params"])]
  assert None not in hit and set(hit) == set(range(len(patterns)))


def test_converter_names_and_passes_unknown_keys():
  sd = {"bert.encoder.layer.3.output.LayerNorm.gamma": np.ones(4, np.float32),
        "bert.pooler.dense.weight": np.ones((4, 4), np.float32),
        "cls.predictions.bias": np.ones(7, np.float32)}
  assert {k: v.shape for k, v in bert.convert_torch(sd).items()} == {
      "params/layer_3/output_norm/scale": (4,), "params/pooler/kernel": (4, 4),
      "cls.predictions.bias": (7,)}


def test_bad_inputs_raise_with_what_was_found():
  model = bert.Bert(config=bert.BertConfig(vocab_size=10, hidden_size=4, num_layers=1,
                                           num_heads=2, intermediate_size=8, max_position=8))
  with pytest.raises(DataError, match=r"found \['input_ids'\]"):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                      {"input_ids": np.zeros((1, 3), np.int32)}))
  tokenizer = text.load_tokenizer(text.minilm_dir())
  with pytest.raises(DataError, match=r"texts\[1\] = 3"):
    text.tokenize(tokenizer, ["fine", 3])
  with pytest.raises(DataError, match="pairs has 1 entries but texts has 2"):
    text.tokenize(tokenizer, ["a", "b"], pairs=["c"])
  with pytest.raises(LoadError, match="No tokenizer file"):
    text.load_tokenizer("/nonexistent/folder")


def test_pairs_get_token_type_one():
  tokenizer = text.load_tokenizer(text.minilm_dir())
  batch = text.trim_padding(text.tokenize(tokenizer, ["a cat"], pairs=["a dog"]))
  # [CLS] a cat [SEP] a dog [SEP]
  assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1]]
  assert batch["input_ids"][0, 0] == 101 and batch["input_ids"][0, -1] == 102


def test_pooler_survives_import_and_export(minilm, tmp_path):
  """BertModel's pooler is loaded (not dropped) and written back by the hf
  export as it was, so transformers finds every BertModel tensor."""
  from safetensors.numpy import load_file

  from jtl.export import hf_export
  model, variables, _, batch, _ = minilm
  published = load_file(weights.resolve("minilm_l6/sentence"))
  np.testing.assert_array_equal(variables["params"]["pooler"]["kernel"],
                                published["pooler.dense.weight"].T)
  out = load_file(hf_export.export_hf(model, variables, tmp_path) / "model.safetensors")
  for name in ("pooler.dense.weight", "pooler.dense.bias"):
    np.testing.assert_array_equal(out[name], published[name])
  assert sorted(out) == sorted(k for k in published if k != "embeddings.position_ids")
  # pooled: tanh of the pooler on the [CLS] state, as transformers' pooler_output.
  h = model.apply(variables, batch, method=bert.Bert.hidden_states)
  want = np.tanh(np.asarray(h)[:, 0] @ published["pooler.dense.weight"].T
                 + published["pooler.dense.bias"])
  np.testing.assert_allclose(model.apply(variables, batch, method=bert.Bert.pooled), want,
                             atol=1e-5)


TINY = bert.BertConfig(vocab_size=50, hidden_size=8, num_layers=1, num_heads=2,
                       intermediate_size=16, max_position=8)


def _tiny_batch(length, ids=3, types=0):
  return {"input_ids": np.full((1, length), ids, np.int32),
          "attention_mask": np.ones((1, length), np.int32),
          "token_type_ids": np.full((1, length), types, np.int32)}


def test_sequences_past_the_positions_and_ids_past_the_tables_are_data_errors():
  model = bert.Bert(config=TINY)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), _tiny_batch(8))  # 8: fine
  variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  with pytest.raises(DataError, match=r"input_ids has 9 tokens per row but the model has 8 "
                     r"positions.*max_length <= 8"):
    jax.jit(model.apply)(variables, _tiny_batch(9))  # the shape, at trace time
  with pytest.raises(DataError, match=r"input_ids\[0, 0\] = 50 is outside the model's "
                     r"vocab_size 50 \(4 ids out of range\)"):
    model.apply(variables, _tiny_batch(4, ids=50))
  with pytest.raises(DataError, match=r"token_type_ids\[0, 0\] = 2 is outside .* type_vocab_size"):
    model.apply(variables, _tiny_batch(4, types=2))


def _tokenizer_file(tmp_path, **changes):
  """MiniLM's tokenizer.json with top-level fields replaced (e.g. truncation=None)."""
  tokenizer = json.loads((text.minilm_dir() / "tokenizer.json").read_text())
  path = tmp_path / "tokenizer.json"
  path.write_text(json.dumps({**tokenizer, **changes}))
  return path


def test_a_tokenizer_without_truncation_truncates_at_the_models_positions(tmp_path):
  path = _tokenizer_file(tmp_path, truncation=None, padding=None)
  long_text = "word " * 40
  assert text.tokenize(text.load_tokenizer(path), long_text)["input_ids"].shape == (1, 42)
  tokenizer = text.load_tokenizer(path, max_position=8)
  assert text.tokenize(tokenizer, [long_text, "a"])["input_ids"].shape == (2, 8)
  short = text.tokenize(text.load_tokenizer(path, max_length=6, max_position=8), long_text)
  assert short["input_ids"].shape == (1, 6)
  for tokenizer_from in (text.load_tokenizer, data_text.load_tokenizer):
    with pytest.raises(ConfigError, match=r"max_length=9 is more than the model's 8 positions"):
      tokenizer_from(path, max_length=9, max_position=8)
    for length in (0, 1):
      with pytest.raises(ConfigError, match=f"max_length={length} leaves no room"):
        tokenizer_from(path, max_length=length)
  # The data pipeline's tokenizer (fixed padding) is capped the same way.
  capped = data_text.load_tokenizer(_tokenizer_file(tmp_path), max_position=8)
  assert data_text.tokenize([long_text], capped)["input_ids"].shape == (1, 8)


def test_a_hub_folders_preprocess_never_passes_its_positions(tmp_path):
  folder = tmp_path / "hub"
  folder.mkdir()
  for name in ("config.json", "model.safetensors"):
    (folder / name).symlink_to(text.minilm_dir() / name)
  _tokenizer_file(folder, truncation=None, padding=None)
  spec = registry.get_spec(str(folder))
  assert spec.preprocess(["word " * 600])["input_ids"].shape == (1, 512)


def test_a_huge_line_is_cut_before_tokenising_with_the_same_ids():
  line = "word " * 200_000  # 1 MB
  head = line[:16 * text.CHARS_PER_TOKEN]
  tokenizer = text.load_tokenizer(text.minilm_dir(), max_length=16)
  np.testing.assert_array_equal(text.tokenize(tokenizer, [line])["input_ids"],
                                text.tokenize(tokenizer, [head])["input_ids"])
  assert text.cut_texts(tokenizer, [line]) == [head]
  pipeline_tokenizer = data_text.load_tokenizer(max_length=16)
  assert data_text.model_text.cut_texts(pipeline_tokenizer, [line]) == [head]
  np.testing.assert_array_equal(data_text.tokenize([line], pipeline_tokenizer)["input_ids"],
                                data_text.tokenize([head], pipeline_tokenizer)["input_ids"])
