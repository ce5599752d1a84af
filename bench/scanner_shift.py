"""The recipe under scanner-like shifts, with or without degradations and marks.

Other hospitals' scanners, presets and exports differ from BUSI's in
sharpness, resolution, speckle, compression, gain and depth. This scores
`cv`'s folds (its own folds, inner splits, fit, temperature, threshold and
`fold_metrics`) on each held-out fold as stored and under eight
deterministic test-time shifts of the same images:
  blur     Gaussian, sigma 1.5 px
  lowres   half resolution (area down, bilinear back up)
  speckle  per-pixel gamma gain, mean 1, shape 6
  jpeg     JPEG quality 30
  gain     gamma 0.7 (brighter mid-tones; never trained on)
  zoomout  0.75 scale about the centre, black border (deeper field of
           view; `--depth` trains on a like shift, anchored at the top)
  zoomin   1.3 scale from the top edge's centre, cropped to the frame (a
           shallower field of view, or an export cropped tighter: the top
           77 % of the field, its middle 77 % across, fills the frame;
           nothing trains on it beyond the views' ±10 % zoom)
  annotate synthetic calipers, dotted lines and text drawn on every image
           (`training.augment.annotate`): a model that reads "marked, so
           a lesion" calls marked normal tissue a lesion
for four recipes that differ only in the training views: geometry only
(`--no_degrade --no_annotate --no_depth`), degrade (`--no_annotate
--no_depth`: views 3, 5, 7 also get `training.augment.degrade`), degrade +
annotate (`--no_depth`: about half of each random view also carries
synthetic annotations) and the default (`--degrade --annotate --depth`:
each random view of an image is also, with probability 0.3, framed as a
deeper depth setting shows it, `training.augment.deepen`). Each runs with
several head initialisations (`bench.cv_seeds`' seeds) on the same views,
so they are paired.
--view_seed draws the random views from another seed while keeping the
folds (the folds follow --seed), to see how much one draw of the views
moves the figures.

The first three shifts resemble what `degrade` trains on, so gains there
are expected; gain is not trained on; zoomout resembles what `--depth`
trains on (which hangs the smaller image from the top edge, not the
centre); zoomin is trained on only as far as the views' ±10 % zoom reaches;
annotate is what `--annotate` trains on. None of these is
another hospital: they show what the degradations buy against these
shifts, not the figures on a real site (use `recalibrate` and `evaluate`
on a labelled local sample for that).

  python -m bench.scanner_shift --data GLOB --backbone_weights H5
      [--seeds 3] [--folds 5] [--seed S] [--view_seed S] [--cache NPZ]
      [--output J] [--threshold_rule expected|observed] [--recipes NAME ...]

Features of every view and shift are computed once (one float32 VGG16
pass per image each: 31 sets for the four recipes, 16 for the default
alone, ~23 min on 623 images on 2 Zen 4 cores without AMX) and kept in
--cache with a stamp of the data, weights and views, so a rerun on the same
ones trains heads only.

  python -m bench.scanner_shift --full_recipe --data GLOB
      --backbone_weights H5 [--folds 5] [--seed S] [--output J]
      [--recipes NAME ...]

runs the recipe as `cv` runs it instead, fine-tune stage included (auto:
the whole base where bfloat16 is fast), with cv's one head initialisation
and draw of the views, and scores each fold's fitted model on its held-out
images under the shifts, from their pixels as scoring does. Its "as_stored"
figures are `cv`'s own. No cache: the base changes with every fold (69 min
for the default on 623 images, 2 cores with AMX).

Either way, each recipe and test set gets the fold means of macro-F1, the
malignant AUC, the three recalls, ECE and the flagging, and the folds'
confusion matrices summed (over the head seeds too in "mean"): where a
shift's misses go, e.g. whether the malignant images it costs are called
benign or normal. The tables printed at the end show macro-F1 / AUC, then
the recalls and the missed malignant images' classes.
"""

import argparse
import dataclasses
import json
import os
import time
from typing import Dict, List, Sequence, Tuple

import numpy as np

import schemas
from bench import common

SHIFTS = ("blur", "lowres", "speckle", "jpeg", "gain", "zoomout", "zoomin",
          "annotate")
SETS = ("as_stored",) + SHIFTS
ZOOMIN = 1.3  # the zoomin shift's scale
FIGURES = ("macro_f1", "auc_malignant", "recall_malignant", "recall_benign",
           "recall_normal", "ece", "flagged_share", "accuracy_unflagged")
# Each set's row also has this: the folds' confusion matrices summed (rows
# true, columns predicted, in schemas.LABELS order), so it says where a
# shift's misses go; in "mean", summed over the head seeds too.
CONFUSION = "confusion_matrix"
# name -> (degrade, annotate, depth)
DEFAULT_RECIPE = "degrade + annotate + depth (default)"
RECIPES = {"geometry only": (False, False, False),
           "degrade": (True, False, False),
           "degrade + annotate": (True, True, False),
           DEFAULT_RECIPE: (True, True, True)}


def shift(image: np.ndarray, kind: str) -> np.ndarray:
  """One of SHIFTS applied to a uint8 [H, W, C] image (deterministic)."""
  import cv2  # pylint: disable=import-outside-toplevel
  from training import augment  # pylint: disable=import-outside-toplevel
  height, width = image.shape[:2]
  out = image.astype(np.float32)
  if kind == "blur":
    out = cv2.GaussianBlur(out, (0, 0), 1.5)
  elif kind == "lowres":
    small = cv2.resize(out, (width // 2, height // 2),
                       interpolation=cv2.INTER_AREA)
    out = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
  elif kind == "speckle":
    rng = np.random.default_rng(int(image.sum()) % 2**32)
    out = out * rng.gamma(6, 1 / 6, size=(height, width))[..., None]
  elif kind == "jpeg":
    return augment.jpeg(image, 30)
  elif kind == "gain":
    out = 255.0 * (out / 255.0) ** 0.7
  elif kind == "annotate":
    return augment.annotate(
        image, np.random.default_rng(int(image.sum()) % 2**32))
  elif kind == "zoomout":
    matrix = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), 0,
                                     0.75)
    out = cv2.warpAffine(out, matrix, (width, height),
                         flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
  elif kind == "zoomin":
    # Input -> output: x' = cx + 1.3 (x - cx), y' = 1.3 y (the top row
    # stays). Every output pixel samples inside the input, so the border
    # value is never read (a test checks that a uniform image stays so).
    centre = (width - 1) / 2
    matrix = np.float32([[ZOOMIN, 0, centre * (1 - ZOOMIN)], [0, ZOOMIN, 0]])
    out = cv2.warpAffine(out, matrix, (width, height),
                         flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
  else:
    raise ValueError(f"unknown shift {kind!r}; one of {SHIFTS}")
  return np.clip(np.round(out), 0, 255).astype(np.uint8).reshape(image.shape)


def _check_recipes(recipes: Sequence[str]) -> None:
  unknown = sorted(set(recipes) - set(RECIPES))
  if unknown or not recipes:
    raise ValueError(f"recipes {unknown or '(none)'} not among"
                     f" {list(RECIPES)}: name one or more of them")


def run(data: Sequence[str], backbone_weights: str = "none",
        backbone: str = "vgg16", seeds: int = 3, folds: int = 5,
        view_seed: int = 0, cache: str = "",
        recipes: Sequence[str] = tuple(RECIPES), **recipe_flags) -> Dict:
  """Returns {"recipes": {name: [per seed {set: {figure: fold mean}}]},
  "mean": {name: {set: {figure: mean over seeds}}}, ...}.

  `recipe_flags`: other TrainConfig fields (epochs, augment_views, ...);
  `degrade` and `annotate` are what the recipes differ in.
  `recipes`: which of RECIPES to run (their views alone are computed).
  """
  from bench import cv_seeds  # pylint: disable=import-outside-toplevel
  from training import calibration, cv  # pylint: disable=import-outside-toplevel
  from training import augment, model as model_lib, recipe, split  # pylint: disable=import-outside-toplevel
  _check_recipes(recipes)
  if recipe_flags.get("fine_tune_epochs"):
    raise ValueError("scanner_shift trains heads on cached features only;"
                     " it cannot fine-tune (fine_tune_epochs must be 0)")
  # Not auto: on a CPU with AMX that would ask for a fine-tune stage.
  recipe_flags = dict(recipe_flags, fine_tune_epochs=0)
  started = time.perf_counter()
  config, loaded, hashes, model = cv_seeds.setup(data, backbone_weights,
                                                 backbone, recipe_flags)
  names = list(schemas.LABELS)
  images, labels = loaded.images, loaded.labels
  size = int(images.shape[1])
  features = model_lib.sub_model(model, None, model_lib.FEATURES_LAYER)
  keys = recipe.draw_keys(loaded.image_ids)
  if cache and not cache.endswith(".npz"):
    cache += ".npz"  # what np.savez writes
  # What the cached features were computed from: another data set, weights
  # file or recipe must not reuse them.
  source = model_lib.weights_source(backbone_weights)
  stamp = json.dumps([split.fingerprint(loaded.image_ids), source, backbone,
                      config.image_size, config.augment_views,
                      "views keyed by image_id, JPEG in RGB order",
                      # Cached views are stale once a draw's ranges change.
                      repr(augment.DEGRADE), repr(augment.ANNOTATE),
                      repr(augment.DEPTH),
                      # The one shift whose size is a named constant.
                      f"zoomin {ZOOMIN}",
                      # A backbone without weights file is drawn from the
                      # seed, so its features are the seed's.
                      config.seed if source == model_lib.NO_WEIGHTS
                      else None])
  table: Dict[str, np.ndarray] = {}
  if cache and os.path.exists(cache):
    table = dict(np.load(cache))
    if str(table.pop("_stamp", "")) != stamp:
      raise ValueError(f"{cache} holds features of other data, weights or"
                       " views; pass another --cache or delete it")

  def save():
    if cache:
      np.savez(cache, _stamp=np.array(stamp), **table)

  def need(key, pixels):
    if key not in table:
      table[key] = model_lib.in_batches(features, pixels(), config.batch_size,
                                        traced=True)
      save()
      print(f"features {key} ({time.perf_counter() - started:.0f} s)",
            flush=True)
    return table[key]

  views = recipe.views(config)
  by_recipe = {}
  for name in recipes:
    degrade, annotate, depth = RECIPES[name]
    by_recipe[name] = {}
    for view in views:
      # View 0 is the images as stored; the seed only draws the others.
      random_view = view > recipe.MIRROR
      key = (f"view{view}"
             + (f"_seed{view_seed}" if random_view else "")
             + ("_annotated" if annotate and recipe.annotated_view(view)
                else "")
             + ("_degraded" if degrade and recipe.degraded_view(view) else "")
             + ("_deep" if depth and recipe.deepened_view(view) else ""))
      by_recipe[name][view] = need(
          key, lambda v=view, d=degrade, a=annotate, e=depth: (
              recipe.view_images(images, v, view_seed, keys, degrade=d,
                                 annotate=a, depth=e)))
  for kind in SHIFTS:
    need(f"shift_{kind}", lambda k=kind: np.stack([shift(i, k)
                                                    for i in images]))

  class _Features:
    """The cache Recipe reads: one recipe's views."""

    def __init__(self, by_view):
      self.by_view = by_view

    def get(self, layer, view, indices):
      assert layer == model_lib.FEATURES_LAYER, layer
      return self.by_view[view][np.asarray(indices, np.int64)]

    def stack(self, layer, views, indices, dtype):
      return np.concatenate([self.get(layer, view, indices)
                             for view in views]).astype(dtype, copy=False)

  fold_of = cv.assign_folds(loaded.image_ids, [names[i] for i in labels],
                            split.duplicate_groups(loaded.image_ids, hashes),
                            folds, config.seed)
  head = model_lib.sub_model(model, model_lib.FEATURES_LAYER,
                             model_lib.LOGITS_LAYER)
  heads = []
  for seed in range(seeds):
    if seed:
      cv_seeds.redraw_head(model, config, size, seed)
    heads.append(model.get_weights())
  results: Dict[str, List[Dict]] = {}
  for name, by_view in by_recipe.items():
    runner = recipe.Recipe(model, _Features(by_view), labels, config,
                           progress=0)
    results[name] = []
    for weights in heads:
      per_fold: Dict[str, List[Dict]] = {s: [] for s in SETS}
      for k in range(folds):
        model.set_weights(weights)
        model_lib.freeze_backbone(model)
        train, val, test = cv.fold_split(k, config, loaded, hashes, fold_of)
        runner.fit(train, val, config.seed + k)
        val_logits = model_lib.in_batches(head, table["view0"][val],
                                          config.batch_size)
        fit = recipe.fit_calibration(config, val_logits, labels[val])
        val_confidence = recipe.confidence(val_logits, labels[val],
                                           fit.temperature)
        for test_set in SETS:
          key = "view0" if test_set == "as_stored" else f"shift_{test_set}"
          logits = model_lib.in_batches(head, table[key][test],
                                        config.batch_size)
          flagging = recipe.choose_flagging(
              config, val_confidence,
              recipe.confidence(logits, labels[test], fit.temperature),
              fit.block["fitted"])
          per_fold[test_set].append(cv.fold_metrics(
              labels[test], calibration.softmax(logits, fit.temperature),
              flagging["threshold"], names))
      results[name].append(_fold_means(per_fold))
      print(f"{name}, head seed {len(results[name]) - 1}: " + ", ".join(
          f"{s} {_fmt(results[name][-1][s]['macro_f1'])}/"
          f"{_fmt(results[name][-1][s]['auc_malignant'])}" for s in SETS),
            flush=True)
  mean = {name: seed_means(rows) for name, rows in results.items()}
  print(format_table(mean))
  print(format_recalls(mean))
  settings = dataclasses.asdict(config)
  settings["data"] = list(config.data)
  # settings hold the config's own degrade/annotate; each recipe sets its.
  settings["recipes"] = {name: dict(zip(("degrade", "annotate", "depth"),
                                         RECIPES[name]))
                         for name in recipes}
  return {"settings": settings, "folds": folds, "seeds": seeds,
          "view_seed": view_seed, "recipes": results, "mean": mean,
          "seconds": round(time.perf_counter() - started, 1)}


def run_full(data: Sequence[str], backbone_weights: str = "none",
             backbone: str = "vgg16", folds: int = 5,
             recipes: Sequence[str] = (DEFAULT_RECIPE,),
             **recipe_flags) -> Dict:
  """`cv` itself, its fine-tune stage included, once per recipe; each
  fold's fitted model also scores its held-out images under SHIFTS.

  The heads-only `run` cannot measure a recipe that fine-tunes the base:
  the base's features then change with every fold. This runs the recipe as
  `cv` does (auto settings resolved as `cv` resolves them: on a CPU with AMX
  the whole base), with one head initialisation and one draw of the views,
  and passes each shifted image through the fold's whole model from its
  pixels, as scoring does (float32), at the fold's temperature and
  threshold (chosen on its validation images as stored).

  Returns `run`'s "recipes" and "mean" with one seed ("as_stored" is `cv`'s
  own summary), and under "cv" each recipe's resolved settings, fold
  seconds and the largest difference between the two routes. Raises
  RuntimeError where the whole model disagrees with `cv`'s cached route on
  the images as stored (the shifted figures would not be comparable).
  """
  _check_recipes(recipes)
  started = time.perf_counter()
  results: Dict[str, List[Dict]] = {}
  reports = {}
  for name in recipes:
    row, reports[name] = _full_recipe(name, data, backbone_weights,
                                      backbone, folds, recipe_flags, started)
    results[name] = [row]
  mean = {name: rows[0] for name, rows in results.items()}
  print(format_table(mean))
  print(format_recalls(mean))
  return {"full_recipe": True, "folds": folds, "seeds": 1,
          "recipes": results, "mean": mean, "cv": reports,
          "seconds": round(time.perf_counter() - started, 1)}


def _full_recipe(name: str, data: Sequence[str], backbone_weights: str,
                 backbone: str, folds: int, recipe_flags: Dict,
                 started: float) -> Tuple[Dict, Dict]:
  """One recipe of `run_full`: its row (test set -> figure -> fold mean)
  and its "cv" entry."""
  from bench import cv_seeds  # pylint: disable=import-outside-toplevel
  from training import calibration, cv  # pylint: disable=import-outside-toplevel
  from training import model as model_lib, recipe  # pylint: disable=import-outside-toplevel
  degrade, annotate, depth = RECIPES[name]
  flags = dict(recipe_flags, degrade=degrade, annotate=annotate, depth=depth)
  config, loaded, hashes, model = cv_seeds.setup(data, backbone_weights,
                                                 backbone, flags)
  names = list(schemas.LABELS)
  labels = loaded.labels
  shifted = {kind: np.stack([shift(i, kind) for i in loaded.images])
             for kind in SHIFTS}
  per_fold: Dict[str, List[Dict]] = {s: [] for s in SHIFTS}
  agreement = []

  def score(k, result):
    test = result["test_indices"]
    temperature, threshold = result["temperature"], result["threshold"]
    # The route every shifted image takes, on the images as stored,
    # against cv's own probabilities (through its conv cache).
    as_stored = calibration.softmax(model_lib.predict_logits(
        model, loaded.images[test], config.batch_size), temperature)
    agreement.append(float(np.max(np.abs(
        as_stored - result["probabilities"]))))
    if agreement[-1] > 1e-3:
      raise RuntimeError(
          f"{name}, fold {k}: the whole model's probabilities differ from"
          f" cv's by {agreement[-1]:.2g} on the images as stored")
    for kind in SHIFTS:
      logits = model_lib.predict_logits(model, shifted[kind][test],
                                        config.batch_size)
      per_fold[kind].append(cv.fold_metrics(
          labels[test], calibration.softmax(logits, temperature),
          threshold, names))
    print(f"{name}, fold {k} ({time.perf_counter() - started:.0f} s): "
          + ", ".join(f"{s} {_fmt(per_fold[s][-1]['macro_f1'])}"
                      for s in SHIFTS), flush=True)

  cache = cv.all_views_cache(config, model, loaded)
  runner = recipe.Recipe(model, cache, labels, config, progress=0)
  report = cv.run_folds(config, folds, runner, loaded, hashes,
                        after_fold=score)
  row = {"as_stored": {f: report["summary"][f]["mean"] for f in FIGURES}}
  row["as_stored"][CONFUSION] = report["pooled"][CONFUSION]
  row.update(_fold_means(per_fold))
  return row, {"settings": report["settings"],
               "fold_seconds": [fold["seconds"] for fold in report["folds"]],
               "max_probability_difference": max(agreement)}


def format_table(mean: Dict) -> str:
  """macro-F1 / AUC (malignant) per recipe and test set."""
  lines = ["| recipe | " + " | ".join(SETS) + " |",
           "|---|" + "---|" * len(SETS)]
  for name, sets in mean.items():
    lines.append(f"| {name} | " + " | ".join(
        f"{_fmt(sets[s]['macro_f1'])} / {_fmt(sets[s]['auc_malignant'])}"
        for s in SETS) + " |")
  return "\n".join(lines)


def format_recalls(mean: Dict) -> str:
  """Per recipe and test set: the recalls (fold means), malignant first,
  and where the missed malignant images went (pooled counts). The other
  classes come from the nearest to malignant down (schemas.LABELS runs
  from normal up), as training/README.md's tables give them."""
  others = [n for n in reversed(schemas.LABELS) if n != schemas.MALIGNANT]
  order = [schemas.MALIGNANT] + others
  malignant = schemas.LABELS.index(schemas.MALIGNANT)
  lines = [f"| recipe: recall {' / '.join(order)};"
           f" missed {schemas.MALIGNANT} → {' / '.join(others)} | "
           + " | ".join(SETS) + " |",
           "|---|" + "---|" * len(SETS)]
  for name, sets in mean.items():
    cells = []
    for s in SETS:
      missed = sets[s][CONFUSION][malignant]
      cells.append(
          " / ".join(_fmt(sets[s][f"recall_{n}"]) for n in order) + "; "
          + " / ".join(str(missed[schemas.LABELS.index(n)]) for n in others))
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def seed_means(rows: Sequence[Dict]) -> Dict[str, Dict]:
  """One recipe's head seeds (each `_fold_means`' row) in one row: each
  figure's mean over the seeds (None where no seed has it), and the
  confusion matrices summed."""
  return _fold_means({s: [row[s] for row in rows] for s in SETS})


def _fold_means(per_fold: Dict[str, List[Dict]]) -> Dict[str, Dict]:
  """test set -> figure -> its mean over the folds (None where no fold has
  it), and CONFUSION -> the folds' confusion matrices summed."""
  return {s: {**{f: _mean([m[f] for m in metrics]) for f in FIGURES},
              CONFUSION: _summed([m[CONFUSION] for m in metrics])}
          for s, metrics in per_fold.items()}


def _summed(matrices) -> List[List[int]]:
  return np.sum(np.asarray(matrices, np.int64), axis=0).tolist()


def _mean(values) -> float:
  present = [v for v in values if v is not None]
  return float(np.mean(present)) if present else None


def _fmt(value) -> str:
  return "n/a" if value is None else f"{value:.3f}"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m bench.scanner_shift",
                                   description=__doc__.split("\n")[0],
                                   allow_abbrev=False)
  parser.add_argument("--data", action="append", required=True)
  parser.add_argument("--backbone_weights", default="imagenet")
  parser.add_argument("--full_recipe", action="store_true",
                      help="run cv's whole recipe, its fine-tune stage"
                      " included, once per recipe (one head seed, one draw)"
                      " and score each fold's model under the shifts"
                      " (--recipes then defaults to the default recipe)")
  parser.add_argument("--seeds", type=int, default=None,
                      help="head initialisations (heads only; default 3)")
  parser.add_argument("--folds", type=int, default=5)
  parser.add_argument("--view_seed", type=int, default=None,
                      help="seed of the random views (heads only; default"
                      " 0)")
  parser.add_argument("--recipes", nargs="+", choices=list(RECIPES),
                      default=None, metavar="RECIPE",
                      help="which recipes to run, of: " + "; ".join(RECIPES)
                      + " (default: all; with --full_recipe the default)")
  parser.add_argument("--cache", default=None,
                      help="NPZ file keeping the features between runs"
                      " (heads only)")
  parser.add_argument("--output", default=None, help="JSON file to write")
  parser.add_argument("--seed", type=int, default=0,
                      help="cv's --seed: the folds, inner splits, fit seeds"
                      " and head seed 0's initialisation (heads only: the"
                      " random views follow --view_seed and head seeds 1, 2,"
                      " ... keep theirs; with --full_recipe everything"
                      " follows this)")
  parser.add_argument("--threshold_rule", choices=schemas.THRESHOLD_RULES,
                      default=schemas.DEFAULT_THRESHOLD_RULE,
                      help="how each fold's review threshold is chosen (as"
                      " train's flag); the flagged figures depend on it")
  args = parser.parse_args(argv)
  if args.full_recipe:
    heads_only = [f"--{name}" for name in ("seeds", "view_seed", "cache")
                  if getattr(args, name) is not None]
    if heads_only:
      parser.error(f"{', '.join(heads_only)}: heads only; --full_recipe runs"
                   " one head seed on one draw of the views, uncached")
    figures = run_full(args.data, args.backbone_weights, folds=args.folds,
                       recipes=args.recipes or [DEFAULT_RECIPE],
                       seed=args.seed, threshold_rule=args.threshold_rule)
  else:
    figures = run(args.data, args.backbone_weights,
                  seeds=3 if args.seeds is None else args.seeds,
                  folds=args.folds,
                  view_seed=args.view_seed or 0, cache=args.cache or "",
                  recipes=args.recipes or list(RECIPES),
                  seed=args.seed, threshold_rule=args.threshold_rule)
  if args.output:
    common.write_json(args.output, figures)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
