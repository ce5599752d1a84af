"""`cv`'s folds of the recipe, repeated with several head initialisations.

One `cv` run gives one draw of the head's initial weights; on 623 BUSI
images that draw alone moves macro-F1 by about ±0.01-0.02, as much as many
recipe changes. This runs the recipe on `cv`'s own folds and inner splits
(`training.cv.run_folds`) once per seed on one shared conv cache: seed 0 is
the head `cv` itself starts from (so its row equals `python -m training cv`
with the same flags), seeds 1... re-draw the head's Dense weights only. The
folds and views stay the same, so two settings compared with
this (for instance two --network_size values) are paired fold by fold.
The draw of the random views moves the figures too (two draws differed
by 0.02 macro-F1: `bench.scanner_shift --view_seed`); this keeps it fixed.

Keep the data the same between settings: folds are dealt by image_id, and
re-encoded images get new ids, hence other folds.

--threshold_rule, repeated, runs the folds once per rule on the same fits
(each fit depends on its seed alone) and compares the review threshold's
rules: how many images each flags, the accuracy on the rest, pooled over
the folds' images too, and how many folds fall more than 0.02 short of the
target.

  python -m bench.cv_seeds --data GLOB [--seeds 3] [--augment_views 7]
      [--network_size N] [--malignant_weight W] [--fine_tune_epochs E]
      [--fine_tune_from LAYER] [--fine_tune_learning_rate LR]
      [--fine_tune_schedule S] [--ema_momentum M] [--fine_tune_ema_momentum M]
      [--threshold_rule expected --threshold_rule observed]
      [--backbone_weights H5] [--folds 5] [--output J]

Prints a line per seed (and rule) and the mean over seeds of each figure's
fold mean; --output writes them as JSON ("seeds" and "mean": the first
rule's; "by_rule": every rule's).
"""

import argparse
import dataclasses
import time
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

import schemas
from bench import common
from training import config as config_lib

FIGURES = ("macro_f1", "recall_malignant", "recall_benign", "recall_normal",
           "accuracy", "ece",
           "auc_malignant", "flagged_share", "accuracy_unflagged")
_HEAD = ("head_dense", schemas.LOGITS_LAYER)
# Per seed besides FIGURES: the flagging pooled over the folds' images, and
# folds whose accuracy on the images not flagged misses the target by more
# than SHORT.
POOLED = ("pooled_flagged_share", "pooled_accuracy_unflagged", "short_folds")
SHORT = 0.02


def run(data: Sequence[str], seeds: int = 3, folds: int = 5,
        backbone_weights: str = "none", backbone: str = "vgg16",
        threshold_rules: Sequence[str] = (), **recipe_flags) -> Dict:
  """Returns {"settings", "seeds": [per-seed fold means], "mean", "by_rule",
  "seconds"}.

  `threshold_rules`: the rules to compare (default: the config's).
  `recipe_flags`: TrainConfig fields (augment_views, network_size, epochs,
  ...).
  """
  from training import cv, model as model_lib, recipe  # pylint: disable=import-outside-toplevel
  started = time.perf_counter()
  config, loaded, hashes, model = setup(data, backbone_weights, backbone,
                                        recipe_flags)
  size = int(loaded.images.shape[1])
  cache = cv.all_views_cache(config, model, loaded)
  rules = list(threshold_rules) or [config.threshold_rule]
  # Per rule: a row per seed, and what each fold's threshold was chosen by
  # (observed where no temperature was fitted).
  by_rule: Dict[str, Dict] = {rule: {"seeds": [], "fold_rules": []}
                              for rule in rules}
  for seed in range(seeds):
    if seed:
      redraw_head(model, config, size, seed)
    for rule in rules:
      ruled = dataclasses.replace(config, threshold_rule=rule)
      runner = recipe.Recipe(model, cache, loaded.labels, ruled, progress=0)
      report = cv.run_folds(ruled, folds, runner, loaded, hashes)
      row = {k: report["summary"][k]["mean"] for k in FIGURES}
      row.update(_pooled(report, ruled.target_accuracy))
      by_rule[rule]["seeds"].append(row)
      by_rule[rule]["fold_rules"].append(
          [fold["threshold_rule"] for fold in report["folds"]])
      print(f"seed {seed}" + (f", rule {rule}" if len(rules) > 1 else "")
            + ": " + ", ".join(f"{k} {_fmt(v)}" for k, v in row.items()),
            flush=True)
  for rule, block in by_rule.items():
    block["mean"] = {k: _mean([row[k] for row in block["seeds"]])
                     for k in FIGURES + POOLED}
    print("mean over seeds" + (f", rule {rule}" if len(rules) > 1 else "")
          + ": " + ", ".join(f"{k} {_fmt(v)}"
                             for k, v in block["mean"].items()))
  settings = dataclasses.asdict(config)
  settings["data"] = list(config.data)
  settings["network_size"] = model_lib.network_size(model)
  first = by_rule[rules[0]]
  return {"settings": settings, "folds": folds, "seeds": first["seeds"],
          "mean": first["mean"], "by_rule": by_rule,
          "conv_cache_s": round(cache.seconds, 2),
          "seconds": round(time.perf_counter() - started, 2)}


def setup(data: Sequence[str], backbone_weights: str, backbone: str,
          recipe_flags: Dict) -> Tuple:
  """What `cv` starts from: (config, labelled data, their dHashes, model
  with cv's initial head)."""
  import keras  # pylint: disable=import-outside-toplevel
  from training import data as data_lib, recipe, split  # pylint: disable=import-outside-toplevel
  from training.config import TrainConfig  # pylint: disable=import-outside-toplevel
  config = TrainConfig(data=tuple(data), output="",
                       backbone_weights=backbone_weights, backbone=backbone,
                       **recipe_flags)
  config.validate(cross_validation=True)
  config = recipe.resolved(config)
  loaded, _ = data_lib.load_labelled(config.data, list(schemas.LABELS),
                                     config.image_size)
  hashes = [split.dhash(image) for image in loaded.images]
  keras.utils.set_random_seed(config.seed)  # as cv: the same initial head
  model = recipe.build_model(config, int(loaded.images.shape[1]))
  return config, loaded, hashes, model


def _pooled(report: Dict, target: Optional[float]) -> Dict:
  """POOLED figures of one cv report."""
  short = None
  if target is not None:
    short = sum(1 for fold in report["folds"]
                if fold["test"]["accuracy_unflagged"] is not None
                and fold["test"]["accuracy_unflagged"] < target - SHORT)
  return {"pooled_flagged_share": report["pooled"]["flagged_share"],
          "pooled_accuracy_unflagged": report["pooled"]["accuracy_unflagged"],
          "short_folds": short}


def redraw_head(model, config, size: int, seed: int) -> None:
  """Gives `model` the head's Dense weights of head-init seed `seed` (> 0;
  seed 0 is the head `cv` builds)."""
  import keras  # pylint: disable=import-outside-toplevel
  from training import model as model_lib, recipe  # pylint: disable=import-outside-toplevel
  keras.utils.set_random_seed(1000 + seed)
  other = recipe.build_model(
      dataclasses.replace(config, backbone_weights=model_lib.NO_WEIGHTS), size)
  for name in _HEAD:
    model.get_layer(name).set_weights(other.get_layer(name).get_weights())


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
  present = [v for v in values if v is not None]
  return float(np.mean(present)) if present else None


def _fmt(value: Optional[float]) -> str:
  return "n/a" if value is None else f"{value:.4f}"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m bench.cv_seeds",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--data", action="append", required=True)
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--folds", type=int, default=5)
  parser.add_argument("--backbone_weights", default="imagenet")
  parser.add_argument("--augment_views", type=int, default=None)
  parser.add_argument("--network_size", type=int, default=None)
  parser.add_argument("--malignant_weight", type=float, default=None)
  parser.add_argument("--fine_tune_epochs", type=int, default=None)
  parser.add_argument("--fine_tune_from", default=None)
  parser.add_argument("--fine_tune_learning_rate", type=float, default=None)
  parser.add_argument("--fine_tune_schedule", default=None,
                      choices=schemas.FINE_TUNE_SCHEDULES)
  parser.add_argument("--ema_momentum", type=float, default=None)
  parser.add_argument("--fine_tune_ema_momentum", type=float, default=None)
  parser.add_argument("--training_precision", dest="precision", default=None,
                      choices=config_lib.PRECISIONS)
  parser.add_argument("--threshold_rule", action="append", default=[],
                      choices=schemas.THRESHOLD_RULES,
                      help="Repeat to compare rules on the same fits.")
  parser.add_argument("--output", default=None, help="JSON file to write")
  args = parser.parse_args(argv)
  # Flags left out keep TrainConfig's defaults.
  flags = {name: getattr(args, name)
           for name in ("augment_views", "network_size", "malignant_weight",
                        "fine_tune_epochs", "fine_tune_from",
                        "fine_tune_learning_rate", "fine_tune_schedule",
                        "ema_momentum", "fine_tune_ema_momentum", "precision")
           if getattr(args, name) is not None}
  figures = run(args.data, args.seeds, args.folds, args.backbone_weights,
                threshold_rules=args.threshold_rule, **flags)
  if args.output:
    common.write_json(args.output, figures)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
