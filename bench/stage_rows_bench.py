"""Peak memory and speed of the fine-tune stage fed two ways.

The fine-tune stage trains on the cached input of its first trained layer
for every view of every training image: for the whole base (the default
where bfloat16 is fast), the pixels of 8 views, 4.8 MB an image in float32.
Until 2026-12-06 they were copied into one float32 array handed to
`fit(x, y, shuffle=True)` (mode "stacked"); now `training.recipe.StageRows`
gathers each batch from the cache (mode "streamed"). Each mode runs in a
process of its own (so each has its own peak RSS), alternating, on the same
images, views and model:

- cache: peak RSS once the cache holds every view (before the stage);
- peak: peak RSS after the stage's epochs;
- epoch: the stage's epochs in seconds (the first one includes tracing);
  the median of the others is the speed figure.

Without --backbone_weights the VGG16 has random weights (the same
computation, so the same speed and memory).

  python -m bench.stage_rows_bench [--images 160] [--views 8] [--epochs 2]
      [--repeats 1] [--fine_tune_from LAYER (default: the whole base)]
      [--backbone vgg16] [--image_size 224] [--output JSON]
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from typing import Dict, List, Optional

import numpy as np

from bench import common

MODES = ("stacked", "streamed")


def _peak_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(mode: str, images: int, views: int, epochs: int,
          fine_tune_from: Optional[str] = None, backbone: str = "vgg16",
          image_size: int = 224, batch_size: int = 32, seed: int = 0
          ) -> Dict:
  """One mode in this process: the figures (see the module docstring)."""
  import cv2  # pylint: disable=import-outside-toplevel
  import keras  # pylint: disable=import-outside-toplevel
  from training import config as config_lib, model as model_lib, recipe  # pylint: disable=import-outside-toplevel
  if mode not in MODES:
    raise ValueError(f"mode {mode!r}: one of {', '.join(MODES)}")
  fine_tune_from = (fine_tune_from
                    or config_lib.FINE_TUNABLE_LAYERS[backbone][0])
  rng = np.random.default_rng(seed)
  pixels = np.stack([cv2.cvtColor(common.ultrasound_like(rng, image_size),
                                  cv2.COLOR_GRAY2RGB) for _ in range(images)])
  labels = rng.integers(0, 3, images)
  keras.utils.set_random_seed(seed)
  model = model_lib.build_model(image_size, backbone=backbone)
  precision = model_lib.resolve_precision("auto")[0]
  model_lib.unfreeze_fine_tuned(model, fine_tune_from)
  cut = model_lib.fine_tune_input(model, fine_tune_from)
  every = np.arange(images)
  stage_views = list(range(views))
  cache = recipe.ConvCache(model, pixels, {v: every for v in stage_views},
                           batch_size, seed, [cut], keys=every,
                           precision=precision)
  cache.sources(cut, stage_views, every)  # every view computed now
  cache_mb = _peak_mb()
  trained = model_lib.reduced_precision_copy(
      model_lib.sub_model(model, cut, None), precision)
  model_lib.compile_model(trained, 3e-5)
  targets = recipe.one_hot(labels, 3)
  class_weight = recipe.balanced_class_weights(labels, 3)
  timer = recipe.EpochTimer()
  if mode == "stacked":
    trained.fit(cache.stack(cut, stage_views, every, np.float32),
                np.tile(targets, (views, 1)), epochs=epochs,
                batch_size=batch_size, shuffle=True,
                class_weight=class_weight, callbacks=[timer], verbose=0)
  else:
    trained.fit(recipe.StageRows(cache, cut, stage_views, every, targets,
                                 batch_size, seed),
                epochs=epochs, shuffle=False, class_weight=class_weight,
                callbacks=[timer], verbose=0)
  return {"mode": mode, "precision": precision, "rows": images * views,
          "fine_tune_from": fine_tune_from,
          "cache_rss_mb": round(cache_mb), "peak_rss_mb": round(_peak_mb()),
          "epoch_s": [round(s, 1) for s in timer.seconds]}


def run(images: int = 160, views: int = 8, epochs: int = 2, repeats: int = 1,
        fine_tune_from: Optional[str] = None, backbone: str = "vgg16",
        image_size: int = 224) -> Dict:
  """Each mode `repeats` times, alternating, one process each."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  runs: Dict[str, List[Dict]] = {mode: [] for mode in MODES}
  for _ in range(repeats):
    for mode in MODES:
      argv = [sys.executable, "-m", "bench.stage_rows_bench", "--child", mode,
              "--images", str(images), "--views", str(views), "--epochs",
              str(epochs), "--backbone", backbone, "--image_size",
              str(image_size)]
      if fine_tune_from:
        argv += ["--fine_tune_from", fine_tune_from]
      out = subprocess.run(argv, env=env, check=True, capture_output=True,
                           text=True).stdout
      runs[mode].append(json.loads(out.strip().splitlines()[-1]))
  figures = {"environment": common.environment(), "images": images,
             "views": views, "epochs": epochs, "backbone": backbone,
             "fine_tune_from": runs[MODES[0]][0]["fine_tune_from"],
             "runs": runs}
  for mode, done in runs.items():
    later = [s for r in done for s in r["epoch_s"][1:]]
    figures[mode] = {
        "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in done),
        "cache_rss_mb": statistics.median(r["cache_rss_mb"] for r in done),
        "epoch_s": statistics.median(later) if later else None}
  stacked, streamed = figures["stacked"], figures["streamed"]
  figures["peak_saved_mb"] = stacked["peak_rss_mb"] - streamed["peak_rss_mb"]
  if stacked["epoch_s"] and streamed["epoch_s"]:
    figures["epoch_ratio_streamed_to_stacked"] = round(
        streamed["epoch_s"] / stacked["epoch_s"], 3)
  return figures


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=160)
  parser.add_argument("--views", type=int, default=8)
  parser.add_argument("--epochs", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--fine_tune_from",
                      help="first trained layer (default: the whole base)")
  parser.add_argument("--backbone", default="vgg16")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--output", help="also write the figures here (JSON)")
  parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(child(args.child, args.images, args.views, args.epochs,
                           args.fine_tune_from, args.backbone,
                           args.image_size)))
    return
  figures = run(args.images, args.views, args.epochs, args.repeats,
                args.fine_tune_from, args.backbone, args.image_size)
  print(f"{figures['images']} images x {figures['views']} views, fine-tune"
        f" from {figures['fine_tune_from']}:")
  print(f"{'mode':<10} {'cache MB':>9} {'peak MB':>9} {'epoch s':>8}")
  for mode in MODES:
    f = figures[mode]
    print(f"{mode:<10} {f['cache_rss_mb']:>9.0f} {f['peak_rss_mb']:>9.0f}"
          f" {f['epoch_s'] or float('nan'):>8.1f}")
  print(f"peak saved: {figures['peak_saved_mb']:.0f} MB; streamed/stacked"
        f" epoch time: {figures.get('epoch_ratio_streamed_to_stacked')}")
  if args.output:
    common.write_json(args.output, figures)
  print(json.dumps(figures))


if __name__ == "__main__":
  main()
