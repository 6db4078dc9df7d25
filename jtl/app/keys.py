"""Every key of a run config, its default and its meaning: the one table.

`configs/default.py` starts from `defaults()` and sets only what its job
chooses; `complete(config)` fills the keys a config leaves out (a config
written by hand, one saved by an older run) from the same table, so the app
reads `config.<key>` strictly and no call site hides a default of its own.
A strategy's options have their defaults in `jtl.recipes.strategies`
(`default_options`); `strategy_options(name)` declares every strategy's
options as config keys (None: the named strategy's default), so that the
command line can switch strategy and set the new one's options.
`table()` renders all of it as the README's list of keys, `listing()` as
the text `scripts/finetune.py --keys` (and `--helpfull`) prints.
"""

from __future__ import annotations

import dataclasses
import textwrap
from typing import Any

import ml_collections

from jtl.errors import ConfigError
from jtl.recipes import strategies

REQUIRED = object()  # no default: the config must set the key


@dataclasses.dataclass(frozen=True)
class Key:
  name: str
  default: Any
  meaning: str
  type: type | None = None  # of a None default, so --config.<key>=... can set it


KEYS: tuple[Key, ...] = (
    Key("model", REQUIRED, "zoo model name (`jtl.models.list_models()`), or 'auto': the "
        "candidate of `model_candidates` whose cached linear probe scores best on eval_split "
        "(`jtl.recipes.selection`; table in the workdir's model_selection.md)"),
    Key("model_candidates", (), "model='auto': the models to try, cheapest first (zoo names, "
        "hf-hub: refs, local Hub-layout folders); empty: the zoo's image models whose "
        "weights ship in an installed pip package (EfficientNet-Lite0/1/2)"),
    Key("model_budget_seconds", 1800.0, "model='auto': seconds for trying the candidates; one "
        "whose feature pass (estimated from one batch) does not fit is skipped (None: no limit)",
        float),
    Key("model_kwargs", {}, "options of the model's constructor, e.g. {'drop_path_rate': 0.1} "
        "for ViT/DINOv2, {'drop_connect_rate': 0.2} for EfficientNet-Lite "
        "(`jtl.app.preflight.model_options`)"),
    Key("pretrained", True, "load the model's pretrained weights (False: random init)"),
    Key("api", "linen", "'linen', or 'nnx': the zoo model trains as a Flax NNX module "
        "(models.create(api='nnx')); checkpoints and exports are the same either way"),
    Key("num_classes", 0, "outputs of the new head (0: the dataset's classes)"),
    Key("dataset", REQUIRED, "a TFDS name or folder:/path/to/images"),
    Key("data_dir", None, "TFDS data folder (None: TFDS's default)", str),
    Key("train_split", "train", "the training split"),
    Key("eval_split", "test", "the split evaluated during training"),
    Key("test_split", None, "a held-out split evaluated once at the end (None: none)", str),
    Key("eval_dataset", None, "the evaluated dataset (None: `dataset`)", str),
    Key("image_size", None, "input size in pixels (None: the model's native size)", int),
    Key("max_length", None, "tokens per text example (None: the model's)", int),
    Key("batch_size", REQUIRED, "global training batch size (a multiple of the devices)"),
    Key("eval_batch_size", None, "evaluation batch size, rounded up to a multiple of the "
        "devices (None or 0: batch_size)", int),
    Key("num_steps", REQUIRED, "training steps (0 with num_epochs > 0)"),
    Key("num_epochs", 0, "training epochs (0: num_steps counts; else steps = epochs x "
        "training examples // batch_size)"),
    Key("warmup_epochs", 0.0, "warmup in epochs, with num_epochs (0: warmup_steps counts)"),
    Key("log_every", 10, "steps between logged training metrics"),
    Key("eval_every", 0, "steps between evaluations (0: at the end; one epoch with num_epochs)"),
    Key("checkpoint_every", 0, "steps between checkpoints (0: at the end; one epoch with "
        "num_epochs)"),
    Key("keep", 2, "checkpoints kept (plus the best by best_metric)"),
    Key("best_metric", "accuracy", "keep the best checkpoint by this eval metric (None: the "
        "latest only)", str),
    Key("optimizer", "adamw", "the optimizer (`jtl.optim.make_optimizer`)"),
    Key("learning_rate", REQUIRED, "peak learning rate"),
    Key("schedule", "cosine", "'cosine', 'linear' or 'constant' decay after warmup"),
    Key("warmup_steps", 0, "linear warmup steps"),
    Key("weight_decay", 0.0, "decoupled weight decay (0: none)"),
    Key("clip_norm", None, "clip the global gradient norm to this (None: no clipping)", float),
    Key("lr_multipliers", {}, "{label: factor} of the learning rate per partition label"),
    Key("strategy", {"name": "rules"},
        "what trains: a `jtl.recipes.strategies` strategy: its name ('rules', 'full', "
        "'scratch', 'linear_probe', 'partial', 'bitfit', 'lora', 'lp_ft', 'gradual', 'llrd') "
        "and its options, `strategy.<option>` below (None: the strategy's default, "
        "`strategies.default_options`); an option the named strategy does not take must stay "
        "None"),
    Key("method", {"name": ""}, "'' (fine-tuning), 'distill', 'dann', 'coral', 'adversarial' "
        "and their options (`jtl.app.methods`)"),
    Key("augment.crop", True, "random resized crops while training"),
    Key("augment.crop_scale", (0.08, 1.0), "the crops' area range, as a fraction of the image"),
    Key("augment.flip", True, "random horizontal flips while training"),
    Key("augment.mixup_alpha", 0.0, "mixup's Beta(alpha, alpha) (0: off)"),
    Key("augment.cutmix_alpha", 0.0, "CutMix's Beta(alpha, alpha) pasted area (0: off; with "
        "mixup: one of the two per batch)"),
    Key("augment.randaugment_n", 0, "RandAugment ops per training image (0: off)"),
    Key("augment.randaugment_m", 9.0, "RandAugment's magnitude, 0..30 (10: the paper's top)"),
    Key("microbatches", 1, "gradient accumulation: micro-batches per step (micro-batch i: "
        "rows i, i+k, ...; a training BatchNorm normalises each alone and moves its running "
        "averages once per step)"),
    Key("compute_dtype", None, "None (float32) or 'bfloat16' (mixed precision)", str),
    Key("seed", 0, "the run's one seed: the head's init, the data order, dropout, LoRA's init "
        "and scratch's re-init"),
    Key("on_nonfinite", "stop", "a NaN/inf loss: 'stop' with an error, or 'skip' the update"),
    Key("resume_schedule", None, "resuming a workdir trained with another learning-rate "
        "schedule (num_steps, warmup_steps, learning_rate, schedule): None: an error showing "
        "both rates; 'new': this config's schedule from the resume step; 'old': the run's own",
        str),
    Key("ema_decay", None, "weight EMA: evaluate, pick the best by and export the moving "
        "average ema = d * ema + (1 - d) * weights after each step (e.g. 0.999; None: off)",
        float),
    Key("distributed", False, "initialize multi-host JAX (TPU VM pods)"),
)
# Every strategy option (the union over the strategies: `strategies.option_defaults`),
# its type, so that --config.strategy.<option>=... parses whatever strategy the
# config names (object: a Python literal), and its meaning. Defaults live in
# jtl/recipes/strategies/builder.py alone.
STRATEGY_OPTIONS: dict[str, tuple[type, str]] = {
    "head": (str, "the layer group that is the new head (the model's layer groups; L2-SP "
             "leaves it out)"),
    "layer_decay": (float, "layer-wise learning-rate decay per group below the head (None: "
                    "off; llrd: `strategies.LAYER_DECAY`)"),
    "stacked": (object, "{group: layers} of a model's stacked (scanned) groups, for "
                "layer_decay (None: none)"),
    "freeze_batchnorm": (object, "True: BatchNorm frozen whole; 'statistics': stored "
                         "statistics, scale and offset train; False: statistics re-estimated "
                         "(None: the strategy's, `strategies.FREEZE_BATCHNORM`)"),
    "precise_batchnorm": (int, "training images the BatchNorm statistics are recomputed on "
                          "before each evaluation and save (0: off; None: "
                          "`strategies.PRECISE_BATCHNORM_IMAGES` where the statistics train)"),
    "l2sp": (float, "L2-SP: pull of the backbone towards its pretrained weights (0: off)"),
    "l2sp_head": (float, "plain L2 on the new head's weights (0: off)"),
    "rules": (object, "rules: ordered (regex, label) rules, first match wins, 'frozen' "
              "freezes"),
    "cache_features": (bool, "linear_probe, lp_ft: the probe trains on cached features "
                       "(None: when nothing prevents it; True: required; False: never)"),
    "num_blocks": (int, "partial: the groups below the head that train"),
    "rank": (int, "lora: the adapters' rank"),
    "alpha": (float, "lora: the adapters' update is scaled by alpha / rank"),
    "targets": (object, "lora: the adapted layers (None: the attention projections, or "
                "every layer but the head)"),
    "dora": (bool, "lora: weight-decomposed LoRA, a trained magnitude per output column"),
    "probe_steps": (int, "lp_ft: head steps of the probe phase"),
    "probe_learning_rate": (float, "lp_ft: the probe phase's learning rate (None: "
                            "`strategies.PROBE_LEARNING_RATE`; the run's learning_rate is "
                            "the fine-tuning phase's)"),
    "steps_per_stage": (int, "gradual: steps between unfreezing stages (required)"),
    "blocks_per_stage": (int, "gradual: groups unfrozen per stage"),
    "max_blocks": (int, "gradual: most groups unfrozen below the head (None: all)"),
}


def _value(default: Any, kind: type | None = None) -> Any:
  if default is None:
    return ml_collections.config_dict.placeholder(kind or object)
  if isinstance(default, dict):
    return ml_collections.ConfigDict({k: _value(v) for k, v in default.items()})
  return default


def strategy_options(name: str, **values: Any) -> ml_collections.ConfigDict:
  """Strategy `name` and every option of every strategy as config keys, so
  that the command line can switch strategy and set its options: each None
  (the strategy's default, `strategies.resolve_options`) unless `values` sets
  it. Unset options the named strategy does not take are dropped when the
  run reads them (`strategy_config`); set ones are an error."""
  strategies.default_options(name)  # an unknown name: a ConfigError naming the strategies
  unknown = sorted(set(values) - set(STRATEGY_OPTIONS))
  if unknown:  # e.g. seed: the run's `seed` is the strategy's (strategy_config)
    raise ConfigError(f"strategy_options({name!r}): unknown option(s) {unknown}; options: "
                      f"{sorted(STRATEGY_OPTIONS)}.")
  options = ml_collections.ConfigDict({"name": name})
  for option, (kind, _) in STRATEGY_OPTIONS.items():
    options[option] = _value(values.get(option), kind)
  return options


def strategy_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config's `strategy` as a dict; no name (or "") is the "rules"
  strategy, whose default rules train every parameter. Its `seed` (LoRA's
  init, scratch's re-init) is the run's `seed`: one knob for every draw.
  Options left unset (None) are dropped: None is the strategy's default
  (`strategies.resolve_options` fills it in), and a config declares every
  strategy's options (`strategy_options`) so that
  `--config.strategy.name=lp_ft --config.strategy.probe_steps=500` parses
  whatever strategy the file names. A set option that the named strategy
  does not take stays, an error (`resolve_options` names it)."""
  raw = config.strategy or {}
  options = dict(raw.to_dict() if hasattr(raw, "to_dict") else raw)
  name = options.get("name") or "rules"
  options = {k: v for k, v in options.items() if v is not None}
  seed = config.seed if "seed" in config else 0
  return {**options, "name": name, "seed": seed}


def strategy_option_defaults(option: str) -> str:
  """`option`'s default per strategy, as text: 'lp_ft: 300'; one value that
  every strategy shares: 'every strategy: 0.0'."""
  every = strategies.option_defaults()
  table = every[option]
  if set(table) == set().union(*every.values()) and len(set(map(repr, table.values()))) == 1:
    return f"every strategy: {next(iter(table.values()))!r}"
  return "; ".join(f"{name}: {value!r}" for name, value in table.items())


def _default(key: Key) -> Any:
  if key.name == "strategy":
    return strategy_options("rules")
  return _value(key.default, key.type)


def defaults() -> ml_collections.ConfigDict:
  """Every key with a default (the required ones left out)."""
  c = ml_collections.ConfigDict()
  for key in KEYS:
    if key.default is REQUIRED:
      continue
    parent, _, leaf = key.name.rpartition(".")
    if parent and parent not in c:
      c[parent] = ml_collections.ConfigDict()
    (c[parent] if parent else c)[leaf] = _default(key)
  return c


def complete(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` with every key it leaves out at its default (a
  given strategy or method keeps exactly its own options)."""
  c = ml_collections.ConfigDict(config.to_dict() if hasattr(config, "to_dict") else config)
  for name, value in defaults().items():
    if name not in c or c[name] is None and name in ("strategy", "method"):
      c[name] = value
    elif isinstance(value, ml_collections.ConfigDict) and name == "augment":
      for leaf, v in value.items():
        if leaf not in c[name]:
          c[name][leaf] = v
  return c


def table() -> str:
  """Every key, its default and meaning, as a Markdown table (the README's)."""
  rows = ["| key | default | meaning |", "|---|---|---|"]
  for key in KEYS:
    default = "required" if key.default is REQUIRED else f"`{key.default!r}`"
    rows.append(f"| `{key.name}` | {default} | {key.meaning} |")
    if key.name == "strategy":
      rows += [f"| `strategy.{option}` | {strategy_option_defaults(option)} | {meaning} |"
               for option, (_, meaning) in STRATEGY_OPTIONS.items()]
  return "\n".join(rows)


def listing(width: int = 79) -> str:
  """Every key, its default and meaning as plain text (`finetune.py --keys`).

  >>> print(listing().splitlines()[1])
    model (required)
  """
  lines = ["Config keys (set one with --config.<key>=<value>; jtl/app/keys.py):"]
  for key in KEYS:
    default = "required" if key.default is REQUIRED else f"default {key.default!r}"
    lines.append(f"  {key.name} ({default})")
    lines += _wrap(key.meaning, width, 6)
    if key.name == "strategy":  # its options, indented under it
      for option, (_, meaning) in STRATEGY_OPTIONS.items():
        lines.append(f"    strategy.{option} ({strategy_option_defaults(option)})")
        lines += _wrap(meaning, width, 8)
  return "\n".join(lines)


def _wrap(text: str, width: int, indent: int) -> list[str]:
  return textwrap.wrap(text, width, initial_indent=" " * indent, subsequent_indent=" " * indent,
                       break_on_hyphens=False, break_long_words=False)
