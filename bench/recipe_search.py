"""Compares training recipes by cross-validation on one shared conv cache.

`python -m bench.recipe_search --data GLOB --backbone_weights W
[--folds 5] [--variants JSON]` reads the labelled TFRecords once, computes
the frozen VGG16's outputs once for as many fixed views as any variant
uses (and block4_pool when one fine-tunes), then runs `training.cv`'s own
folds for each variant: the same code and folds as `python -m training cv`
with those flags, so each row is what that command would report, at the
cost of k head fits instead of a VGG16 pass per variant. It prints one row
per variant (mean ± sd over folds) and writes JSON. This is how the
defaults in training/README.md were chosen.

A variant is a JSON object of TrainConfig fields that differ from the
defaults, e.g. {"augment_views": 0, "learning_rate": 1e-4, "epochs": 30,
"patience": 0, "label_smoothing": 0}.
"""

import argparse
import dataclasses
import json
import os
import time
from typing import Dict, List, Optional

import schemas
from bench import common

# The comparisons behind the defaults (training/README.md). These were run
# before the malignant class weight existed, i.e. with plain balanced
# weights (malignant_weight 1), which DEFAULT_VARIANTS keeps them at: their
# "default" meant the default of then.
_BALANCED_VARIANTS = {
    "seed recipe: originals, lr 1e-4, 30 epochs": {
        "augment_views": 0, "learning_rate": 1e-4, "epochs": 30,
        "patience": 0, "label_smoothing": 0.0},
    "originals, lr 1e-3, early stopping": {
        "augment_views": 0, "label_smoothing": 0.0},
    "+ label smoothing 0.1": {"augment_views": 0},
    "+ mirror view": {"augment_views": 1},
    "+ mirror and 4 random views": {"augment_views": 5},
    "mirror and 6 random views": {},
    "default, lr 3e-4": {"learning_rate": 3e-4},
    "default, label smoothing 0.2": {"label_smoothing": 0.2},
    "default, no label smoothing": {"label_smoothing": 0.0},
    "mirror view + block5 fine-tuned (5 epochs)": {
        "augment_views": 1, "fine_tune_epochs": 5},
}
# Every row as it ran then: float32, no fine-tune stage unless the row asks
# (today's "auto" would fine-tune the whole base in bfloat16 on a CPU with
# AMX).
_THEN = {"fine_tune_epochs": 0, "precision": "float32"}
DEFAULT_VARIANTS = {
    **{name: {**_THEN, "malignant_weight": 1.0, **flags}
       for name, flags in _BALANCED_VARIANTS.items()},
    "head-only default of 2026-12-04: mirror and 6 random views, malignant"
    " weight 2": dict(_THEN),
}

_COLUMNS = ("macro_f1", "recall_malignant", "accuracy", "ece",
            "auc_malignant", "flagged_share", "accuracy_unflagged")


def run(patterns: List[str], backbone_weights: str, variants: Dict[str, Dict],
        folds: int = 5, backbone: str = "vgg16", seed: int = 0,
        batch_size: int = 32) -> Dict:
  """Cross-validates every variant on one shared cache; returns figures."""
  import keras  # pylint: disable=import-outside-toplevel
  import schemas  # pylint: disable=import-outside-toplevel
  from training import cv, data as data_lib, model as model_lib  # pylint: disable=import-outside-toplevel
  from training import recipe, split  # pylint: disable=import-outside-toplevel
  from training.config import TrainConfig  # pylint: disable=import-outside-toplevel

  configs = {name: TrainConfig(data=tuple(patterns), output="",
                               backbone_weights=backbone_weights,
                               backbone=backbone, seed=seed,
                               batch_size=batch_size, **fields)
             for name, fields in variants.items()}
  for name, config in configs.items():
    config.validate(cross_validation=True)
    configs[name] = recipe.resolved(config)
  if len({(config.degrade, config.annotate, config.depth, config.precision)
           for config in configs.values()}) > 1:
    # One shared cache holds one set of views, computed one way.
    raise ValueError("recipe_search: every variant must have the same"
                     " degrade, annotate, depth and training_precision"
                     " settings"
                     " (one cache serves them all); run variants that differ"
                     " in them separately")
  started = time.perf_counter()
  data, _ = data_lib.load_labelled(patterns, schemas.LABELS)
  hashes = [split.dhash(image) for image in data.images]
  keras.utils.set_random_seed(seed)
  model = model_lib.build_model(int(data.images.shape[1]), backbone_weights,
                                len(schemas.LABELS), backbone)
  widest = max(configs.values(), key=lambda c: c.augment_views)
  fine_tunes = any(c.fine_tune_epochs for c in configs.values())
  layers = recipe.cache_layers(
      dataclasses.replace(widest, fine_tune_epochs=int(fine_tunes)), model)
  cache = cv.all_views_cache(widest, model, data, layers)
  rows = {}
  for name, config in configs.items():
    variant_started = time.perf_counter()
    runner = recipe.Recipe(model, cache, data.labels, config, progress=0)
    report = cv.run_folds(config, folds, runner, data, hashes)
    rows[name] = {
        "variant": variants[name],
        "summary": report["summary"],
        "pooled": {k: v for k, v in report["pooled"].items()
                   if k != "confusion_matrix"},
        "epochs_run": [f["epochs_run"] for f in report["folds"]],
        # A fold model that predicted one class, or never predicted one it
        # should (cv's checks): its row's figures are partly such a model's.
        "warnings": report[schemas.CV_WARNINGS],
        "seconds": round(time.perf_counter() - variant_started, 1),
    }
    print(format_row(name, rows[name]), flush=True)
    for warning in rows[name]["warnings"]:
      print(f"  WARNING: {warning}", flush=True)
  return {"images": int(len(data.labels)), "folds": folds,
          "backbone_weights": backbone_weights,
          "conv_cache_seconds": round(cache.seconds, 1),
          "total_seconds": round(time.perf_counter() - started, 1),
          "environment": common.environment(), "variants": rows}


def _cell(stats: Dict) -> str:
  if stats.get("mean") is None:
    return "n/a"
  return f"{stats['mean']:.3f}±{(stats.get('sd') or 0.0):.3f}"


def format_row(name: str, row: Dict) -> str:
  cells = "  ".join(f"{column}={_cell(row['summary'][column])}"
                    for column in _COLUMNS)
  return f"{name:<45} {row['seconds']:>6.0f}s  {cells}"


def main(argv: Optional[List[str]] = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m bench.recipe_search",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--data", action="append", required=True)
  parser.add_argument("--backbone_weights", required=True)
  parser.add_argument("--backbone", default="vgg16")
  parser.add_argument("--folds", type=int, default=5)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--variants", default=None,
                      help="JSON {name: {TrainConfig field: value}}; default:"
                      " the comparisons behind the defaults.")
  parser.add_argument("--output", default="bench_output/recipe_search.json")
  args = parser.parse_args(argv)
  variants = (json.loads(args.variants) if args.variants else
              DEFAULT_VARIANTS)
  figures = run(args.data, args.backbone_weights, variants, args.folds,
                args.backbone, args.seed)
  os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
  with open(args.output, "w", encoding="utf-8") as f:
    json.dump(figures, f, indent=2)
  print(f"conv cache {figures['conv_cache_seconds']} s, total"
        f" {figures['total_seconds']} s; JSON in {args.output}")


if __name__ == "__main__":
  main()
