"""How fast training's conv cache runs the frozen VGG16, and what that means
for the default `train`.

`train` and `cv` run the frozen base once over every image and view
(`training.recipe.ConvCache`) and then train the head on the cached
features; on 2 cores that pass is most of a default `train`'s wall time.
This measures, on the same uint8 batches and in one process, alternating
rounds (so both ways see the same machine load):

- predict: `keras.Model.predict` on the features sub-model (what the cache
  called before 2026-12-04);
- traced call: `training.model.in_batches(..., traced=True)`, the traced
  `tf.function` scoring uses (what the cache calls now);
- traced call, bfloat16: the same on the bfloat16 copy that
  `--training_precision bfloat16` (auto where the CPU has AMX-BF16 or
  AVX512-BF16) computes the augmented views with, and its largest feature
  difference from float32, relative to the features' largest value;

and the fine-tune stage's training step (block5 and the head, forward and
backward, on block4_pool rows) in float32 and in bfloat16, as rows a second.

Figures are medians over the rounds, warm-up (tracing) excluded, plus the
projected time of the default recipe's conv pass over N images
(`--project_images`, 623 for the BUSI dev set) at the traced call's speed.
Without --backbone_weights the VGG16 has random weights (the same
computation as a trained one, so the same speed).

  python -m bench.conv_cache_bench [--count 96] [--repeats 3]
      [--backbone_weights H5] [--project_images 623] [--network_size N]
      [--fine_tune_rows 128]
"""

import argparse
import json
import statistics
import time
from typing import Callable, Dict, Optional

import numpy as np

import schemas
from bench import common


def run(count: int = 96, batch_size: int = 32, repeats: int = 3,
        image_size: int = 224, backbone: str = "vgg16",
        backbone_weights: Optional[str] = None,
        project_images: int = 623,
        network_size: Optional[int] = None,
        fine_tune_rows: int = 128) -> Dict:
  """Measures every way on the same images; returns the figures.

  `network_size`: the backbone's input size (the model resizes to it);
  None: image_size, no resize (the recipe's default). `fine_tune_rows`:
  block4_pool rows of one timed fine-tune epoch (0: not measured).
  """
  from training import config as config_lib  # pylint: disable=import-outside-toplevel
  from training import model as model_lib  # pylint: disable=import-outside-toplevel
  from busi_core import precision  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  network_size = network_size or image_size
  model = model_lib.build_model(
      image_size, backbone_weights or model_lib.NO_WEIGHTS,
      len(schemas.LABELS), backbone, network_size)
  sub = model_lib.sub_model(model, None, schemas.FEATURES_LAYER)
  reduced = model_lib.reduced_precision_copy(sub, config_lib.BFLOAT16)
  images = np.stack([
      np.repeat(common.ultrasound_like(rng, image_size)[..., None], 3, -1)
      for _ in range(count)])
  ways = {
      "predict": lambda: sub.predict(images, batch_size=batch_size,
                                     verbose=0),
      "traced_call": lambda: model_lib.in_batches(sub, images, batch_size,
                                                  traced=True),
      "traced_call_bfloat16": lambda: model_lib.in_batches(
          reduced, images, batch_size, traced=True),
  }
  outputs = {name: call() for name, call in ways.items()}  # warm-up
  rate = _rates(ways, count, repeats)
  views = 1 + config_lib.DEFAULT_AUGMENT_VIEWS
  exact = outputs["traced_call"]
  figures = {
      "environment": common.environment(),
      "cpu_bfloat16_flags": list(precision.cpu_bfloat16_flags()),
      "auto_precision": model_lib.resolve_precision(config_lib.AUTO)[0],
      "images": count, "batch_size": batch_size, "repeats": repeats,
      "image_size": image_size, "network_size": network_size,
      "backbone": backbone,
      "images_per_s": {k: round(v, 2) for k, v in rate.items()},
      "speedup": round(rate["traced_call"] / rate["predict"], 3),
      "max_abs_difference": float(np.abs(outputs["predict"] - exact).max()),
      "bfloat16_speedup": round(rate["traced_call_bfloat16"] /
                                rate["traced_call"], 3),
      "bfloat16_max_relative_difference": float(
          np.abs(outputs["traced_call_bfloat16"] - exact).max() /
          max(float(np.abs(exact).max()), 1e-12)),
      "default_views": views,
      "projected_conv_pass_s": {
          "images": project_images,
          **{name: round(project_images * views / rate[name], 2)
             for name in ways},
      },
  }
  if fine_tune_rows:
    figures["fine_tune"] = _fine_tune(model, fine_tune_rows, batch_size,
                                      repeats, rng)
  return figures


def _rates(ways: Dict[str, Callable], count: int,
           repeats: int) -> Dict[str, float]:
  """Items a second of each way: median of `repeats` alternating rounds
  (so every way sees the same machine load)."""
  seconds = {name: [] for name in ways}
  for _ in range(repeats):
    for name, call in ways.items():
      started = time.perf_counter()
      call()
      seconds[name].append(time.perf_counter() - started)
  return {name: count / statistics.median(s) for name, s in seconds.items()}


def _fine_tune(model, rows: int, batch_size: int, repeats: int,
               rng: np.random.Generator) -> Dict:
  """One epoch of the fine-tune stage (block5 and the head on cached
  block4_pool rows) in float32 and in bfloat16, rows a second."""
  import keras  # pylint: disable=import-outside-toplevel
  from training import config as config_lib, model as model_lib  # pylint: disable=import-outside-toplevel
  unfrozen = model_lib.unfreeze_fine_tuned(model)
  cut = model_lib.fine_tune_input(model)
  target = model_lib.sub_model(model, cut, None)
  shape = tuple(model.get_layer(cut).output.shape[1:])
  x = rng.random((rows,) + shape, dtype=np.float32)
  y = keras.utils.to_categorical(rng.integers(0, 3, rows), 3)
  trained = {}
  for name in (config_lib.FLOAT32, config_lib.BFLOAT16):
    copy = model_lib.reduced_precision_copy(target, name)
    model_lib.compile_model(copy, 1e-5)
    copy.fit(x[:batch_size], y[:batch_size], batch_size=batch_size,
             verbose=0)  # warm-up: tracing
    trained[name] = (lambda c: lambda: c.fit(x, y, batch_size=batch_size,
                                             verbose=0))(copy)
  rate = _rates(trained, rows, repeats)
  return {"rows": rows, "layers": list(unfrozen),
          "rows_per_s": {k: round(v, 2) for k, v in rate.items()},
          "bfloat16_speedup": round(rate[config_lib.BFLOAT16] /
                                    rate[config_lib.FLOAT32], 3)}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m bench.conv_cache_bench",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--count", type=int, default=96)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--backbone_weights", default=None)
  parser.add_argument("--project_images", type=int, default=623)
  parser.add_argument("--network_size", type=int, default=None,
                      help="VGG16's input size (default: 224, no resize)")
  parser.add_argument("--fine_tune_rows", type=int, default=128,
                      help="block4_pool rows of the timed fine-tune epoch"
                      " (0: skip)")
  args = parser.parse_args(argv)
  print(json.dumps(run(args.count, args.batch_size, args.repeats,
                       backbone_weights=args.backbone_weights,
                       project_images=args.project_images,
                       network_size=args.network_size,
                       fine_tune_rows=args.fine_tune_rows), indent=2))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
