"""Training methods beyond plain fine-tuning, selected by a config's `method`.

`config.method.name` picks how `scripts/finetune.py` trains; the rest of the
config (model, data, rules, optimizer, schedule, checkpoints) is unchanged:

- "" / "finetune": `jtl.make_train_step` (the default).
- "distill": a frozen teacher, restored from another run's workdir
  (`teacher_workdir`, `teacher_step`), gives soft targets on the fly
  (`temperature`, `alpha`; `jtl.recipes.distill`). The teacher sees each batch with
  its own image size and normalisation.
- "dann" / "coral": unsupervised domain adaptation (`jtl.recipes.domain`); each batch
  also carries unlabelled images of `target_dataset` / `target_split`
  (`weight`, `batchnorm`, and for DANN `domain_hidden`, `grl_gamma`).
  batchnorm "joint" (default) normalises source and target rows as one batch;
  "separate" normalises each domain with its own batch statistics and keeps
  the running statistics the source's, so the target is evaluated after AdaBN
  (`needs_adabn`; `jtl.app.evaluation.evaluate_workdir` applies it by itself).
  Checkpoints hold the wrapped model ("model/...", "domain/...");
  `plain_variables` unwraps them. The strategy's L2-SP and layer-wise decay
  act on "model/..."; the domain classifier trains with the optimizer alone.
- "adversarial": PGD or FGSM inputs made with the current params
  (`attack`, `eps`, `step_size`, `steps`, `clean_fraction`;
  `jtl.recipes.adversarial`). eps and step_size are in pixel units (0..1 of the
  pixel range) and converted to the model's normalised inputs.

>>> sorted(DEFAULTS)
['adversarial', 'coral', 'dann', 'distill']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jtl.errors import ConfigError, bullet_list
from jtl.models import preprocessing
from jtl.recipes import adversarial, distill, domain
from jtl.tree import PyTree

DEFAULTS: dict[str, dict[str, Any]] = {
    "distill": {"teacher_workdir": None, "teacher_step": "best", "temperature": 4.0,
                "alpha": 0.9},
    # domain_hidden 1024: the DANN paper's head (2 layers, dropout 0.5), jtl.recipes.domain's default.
    "dann": {"target_dataset": None, "target_split": "train", "weight": 1.0,
             "domain_hidden": 1024, "grl_gamma": 10.0, "batchnorm": "joint"},
    "coral": {"target_dataset": None, "target_split": "train", "weight": 1.0,
              "batchnorm": "joint"},
    "adversarial": {"attack": "pgd", "eps": 0.1, "step_size": None, "steps": 7,
                    "clean_fraction": 0.0},
}
DOMAIN_METHODS = ("dann", "coral")


def method_name(config: ml_collections.ConfigDict) -> str:
  """The config's method ("" for plain fine-tuning)."""
  method = config.method or {}
  name = method.get("name") or ""
  return "" if name == "finetune" else name


def resolve_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The method's options with defaults; unknown names or options raise."""
  name = method_name(config)
  if not name:
    return {}
  if name not in DEFAULTS:
    raise ConfigError(f"method.name={name!r}: expected '' (fine-tuning) or one of "
                      f"{sorted(DEFAULTS)}.")
  given = {k: v for k, v in dict(config.method).items() if k != "name"}
  unknown = sorted(set(given) - set(DEFAULTS[name]))
  if unknown:
    raise ConfigError(f"method {name!r} has no options {unknown}; its options are "
                      f"{sorted(DEFAULTS[name])}.")
  options = {**DEFAULTS[name], **{k: v for k, v in given.items() if v is not None}}
  problems = []
  if name == "distill" and not options["teacher_workdir"]:
    problems.append("method.teacher_workdir: the workdir of a finished run "
                    "(scripts/finetune.py) whose model is the teacher")
  if name in DOMAIN_METHODS and not options["target_dataset"]:
    problems.append("method.target_dataset: the unlabelled target domain (e.g. 'jtl_digits')")
  if name in DOMAIN_METHODS and options["batchnorm"] not in domain.BATCHNORM_MODES:
    problems.append(f"method.batchnorm={options['batchnorm']!r}: one of "
                    f"{domain.BATCHNORM_MODES} ('joint': one BatchNorm batch of both domains; "
                    "'separate': each domain its own, target evaluated after AdaBN)")
  if problems:
    example = {"name": name, **{p.split(":")[0].split("=")[0][len("method."):]: "..."
                                for p in problems}}
    # `--config.method.<option>` parses only for options the config file declares.
    raise ConfigError(f"method {name!r} needs:\n" + bullet_list(problems) + "\nSet the "
                      f"method with its options as one dict: --config.method=\"{example}\" "
                      "(or start from its config: configs/distill.py, domain.py, "
                      "adversarial.py).")
  return options


def needs_adabn(config: ml_collections.ConfigDict) -> bool:
  """Whether the run's target must be evaluated after AdaBN: a DANN / CORAL run
  with batchnorm "separate" keeps the source's running statistics, which do not
  describe the target's features."""
  if method_name(config) not in DOMAIN_METHODS:
    return False
  return (config.method.get("batchnorm") or "joint") == "separate"


def pixel_affine(normalize: Any) -> tuple[np.ndarray, np.ndarray]:
  """(mul, add) per channel with normalised = pixel01 * mul + add.

  `normalize` is what the pipeline takes (a preset name, a (mean, std) pair,
  a `Normalization`, None); its affine is data (`Normalization.affine`), so no
  TensorFlow runs. A callable normaliser is run on black and white NumPy
  pixels instead.

  >>> mul, add = pixel_affine("unit")
  >>> mul.tolist(), add.tolist()
  ([1.0, 1.0, 1.0], [0.0, 0.0, 0.0])
  """
  if callable(normalize):
    return preprocessing.affine_of(normalize)
  return preprocessing.as_normalization(normalize).affine()


def attack_units(normalize: Any) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
  """(input_scale, bounds) per channel that make an attack's pixel-unit eps
  exactly eps in every channel and keep its pixels in [0, 1].

  One number for all channels would give each channel mul_c / mean(mul) times
  eps, and one (low, high) pair would let pixels leave [0, 1].

  >>> scale, (low, high) = attack_units(((127.5,) * 3, (63.75, 127.5, 255.0)))
  >>> scale.tolist(), low.tolist(), high.tolist()
  ([4.0, 2.0, 1.0], [-2.0, -1.0, -0.5], [2.0, 1.0, 0.5])
  """
  mul, add = pixel_affine(normalize)
  mul, add = np.asarray(mul, np.float32), np.asarray(add, np.float32)
  return mul, (add, mul + add)


def teacher_input_fn(student_normalize: Any, student_size: int, teacher_normalize: Any,
                     teacher_size: int) -> Callable[[jax.Array], jax.Array]:
  """Maps a student batch to the teacher's inputs (pixels, resize, normalise)."""
  s_mul, s_add = pixel_affine(student_normalize)
  t_mul, t_add = pixel_affine(teacher_normalize)
  row = lambda a: jnp.asarray(a).reshape(1, 1, 1, 3)

  def convert(x):
    pixels = (x - row(s_add)) / row(s_mul)
    if teacher_size != student_size:
      pixels = jax.image.resize(pixels, (x.shape[0], teacher_size, teacher_size, x.shape[3]),
                                "bilinear")
    return pixels * row(t_mul) + row(t_add)

  return convert


# `start_step -> iterator` of training batches.
Batches = Callable[[int], Iterator[dict[str, Any]]]


@dataclasses.dataclass
class Method:
  """How a config trains, as the pieces of `jtl.make_train_step`: the model
  (and how it is called), its variables, the loss and the batch transform
  (None: the defaults), and the batch stream. All methods share the one train
  step, so microbatches, compute_dtype and the mesh apply to each."""
  name: str
  module: Any
  variables: PyTree
  labels: Callable[[PyTree], PyTree]
  loss_fn: Callable | None
  batch_transform: Callable | None
  train_batches: Callable[[int], Iterator[dict[str, Any]]]
  describe: str = ""


def plain_variables(config: ml_collections.ConfigDict, variables: PyTree) -> PyTree:
  """The zoo model's variables from a checkpoint of this config's method."""
  if method_name(config) in DOMAIN_METHODS and "model" in variables.get("params", {}):
    return domain.unwrap(variables)
  return variables


def _same_labels(labels: PyTree) -> PyTree:
  """A method that keeps the model's partition as it is."""
  return labels


def build(config: ml_collections.ConfigDict, module: Any, variables: PyTree, spec: Any,
          train_batches: Batches, make_target_batches: Callable[[str, str], Batches],
          ) -> Method:
  """The `Method` of `config.method` around an already-partitioned model.

  Args:
    module, variables, spec: the model to train (after any strategy).
    train_batches: `start_step -> iterator` of the config's training data.
    make_target_batches: `(dataset, split) -> (start_step -> iterator)` over
      the target domain, with the same preprocessing.

  For DANN / CORAL the caller rebuilds each phase's optimizer from
  `method.labels(labels)`, the partition of the wrapped model, with the
  strategy's L2-SP and layer-wise decay on its "model" subtree
  (`experiment.wrapped_phases`).
  """
  name = method_name(config)
  options = resolve_options(config)
  if not name:
    return Method("finetune", module, variables, _same_labels, None, None, train_batches)
  image_size = config.image_size or spec.image_size
  if name == "distill":
    return _distill_method(options, module, variables, spec, image_size, train_batches)
  if name == "adversarial":
    return _adversarial_method(options, module, variables, spec, train_batches)
  if (config.strategy or {}).get("name") not in (None, "", "rules"):
    raise ConfigError(f"method {name!r} is built on strategy.rules; strategy "
                      f"{config.strategy.name!r} cannot be combined with it here.")
  return _domain_method(config, name, options, module, variables, spec, image_size,
                        train_batches, make_target_batches)


def _teacher(options: dict[str, Any], spec: Any, image_size: int,
             ) -> tuple[Callable[[jax.Array], jax.Array], dict[str, Any]]:
  """The teacher of `options["teacher_workdir"]` (as `workdirs.restore` rebuilds
  a run: a LoRA run's adapters folded in, an NNX run's statistics renamed) on
  the student's batches (inputs converted to its pixels, size and
  normalisation), and its meta."""
  # In the function: workdirs imports this module at its top (an import cycle).
  from jtl.app import workdirs  # pylint: disable=g-import-not-at-top
  try:
    run = workdirs.restore(options["teacher_workdir"], step=options["teacher_step"])
  except ConfigError as e:
    raise ConfigError(f"method.teacher_workdir: {e} The teacher must be a scripts/finetune.py "
                      "run.") from e
  t_size = run.config.image_size or run.spec.image_size
  convert = teacher_input_fn(spec.normalization, image_size, run.spec.normalization, t_size)
  run_teacher = distill.teacher_fn(run.module, run.merged_variables())
  return lambda x: run_teacher(convert(x)), run.meta


def _distill_method(options: dict[str, Any], module: Any, variables: PyTree, spec: Any,
                    image_size: int, train_batches: Batches) -> Method:
  """Knowledge distillation from a finished run's model (the teacher)."""
  teacher, meta = _teacher(options, spec, image_size)
  model, loss_fn, transform = distill.distill_parts(
      module, temperature=options["temperature"], alpha=options["alpha"], teacher=teacher)
  return Method("distill", model, variables, _same_labels, loss_fn, transform, train_batches,
                f"teacher {meta['model']} from {options['teacher_workdir']} "
                f"(step {meta.get('step')}), T={options['temperature']}, "
                f"alpha={options['alpha']}")


def _adversarial_method(options: dict[str, Any], module: Any, variables: PyTree, spec: Any,
                        train_batches: Batches) -> Method:
  """Adversarial training (FGSM / PGD) on the normalised inputs."""
  input_scale, bounds = attack_units(spec.normalization)
  model, loss_fn, transform = adversarial.adversarial_parts(
      module, attack=options["attack"], eps=options["eps"], step_size=options["step_size"],
      steps=options["steps"], clean_fraction=options["clean_fraction"],
      input_scale=input_scale, bounds=bounds)
  return Method("adversarial", model, variables, _same_labels, loss_fn, transform,
                train_batches,
                f"{options['attack']} eps={options['eps']} (pixel units), "
                f"{options['steps']} steps, clean_fraction={options['clean_fraction']}")


def _domain_method(config: ml_collections.ConfigDict, name: str, options: dict[str, Any],
                   module: Any, variables: PyTree, spec: Any, image_size: int,
                   train_batches: Batches, make_target_batches: Callable[[str, str], Batches],
                   ) -> Method:
  """DANN / CORAL: the model wrapped with its adaptation parts, source
  batches paired with target-domain inputs."""
  example = spec.example_input(2)
  if spec.input_kind == "image":
    example = np.zeros((2, image_size, image_size, 3), np.float32)
  wrapped_module, wrapped_vars = domain.wrap(
      module, variables, example, method=name,
      domain_hidden=options.get("domain_hidden", 1024), rng=config.seed)

  def wrap_labels(labels):
    out = {"model": labels}
    if "domain" in wrapped_vars["params"]:
      out["domain"] = jax.tree.map(lambda _: "domain", wrapped_vars["params"]["domain"])
    return out

  targets = make_target_batches(options["target_dataset"], options["target_split"])

  def with_targets(start_step: int) -> Iterator[dict[str, Any]]:
    for batch, target in zip(train_batches(start_step), targets(start_step)):
      mask = {"target_mask": target["mask"]} if "mask" in target else {}
      yield {**batch, "target_inputs": target["inputs"], **mask}

  grl = domain.dann_schedule(config.num_steps, gamma=options.get("grl_gamma", 10.0))
  model, loss_fn, transform = domain.adapt_parts(wrapped_module, method=name,
                                                 weight=options["weight"], grl_scale=grl,
                                                 batchnorm=options["batchnorm"])
  note = ""
  if options["batchnorm"] == "separate":
    note = ("; the evaluations during training use the source's BatchNorm statistics, "
            "scripts/evaluate.py evaluates the target after AdaBN")
  return Method(name, model, wrapped_vars, wrap_labels, loss_fn, transform, with_targets,
                f"target {options['target_dataset']}:{options['target_split']} "
                f"(labels unused), weight={options['weight']}, "
                f"batchnorm={options['batchnorm']!r}{note}")
