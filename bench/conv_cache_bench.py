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
  `tf.function` scoring uses (what the cache calls now).

Figures are medians over the rounds, warm-up (tracing) excluded, plus the
projected time of the default recipe's conv pass over N images
(`--project_images`, 623 for the BUSI dev set) at the traced call's speed.
Without --backbone_weights the VGG16 has random weights (the same
computation as a trained one, so the same speed).

  python -m bench.conv_cache_bench [--count 96] [--repeats 3]
      [--backbone_weights H5] [--project_images 623] [--network_size N]
"""

import argparse
import json
import statistics
import time
from typing import Dict, Optional

import numpy as np

import schemas
from bench import common


def run(count: int = 96, batch_size: int = 32, repeats: int = 3,
        image_size: int = 224, backbone: str = "vgg16",
        backbone_weights: Optional[str] = None,
        project_images: int = 623,
        network_size: Optional[int] = None) -> Dict:
  """Measures both ways on the same images; returns the figures.

  `network_size`: the backbone's input size (the model resizes to it);
  None: image_size, no resize (the recipe's default).
  """
  from training import config as config_lib  # pylint: disable=import-outside-toplevel
  from training import model as model_lib  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  network_size = network_size or image_size
  model = model_lib.build_model(
      image_size, backbone_weights or model_lib.NO_WEIGHTS,
      len(schemas.LABELS), backbone, network_size)
  sub = model_lib.sub_model(model, None, schemas.FEATURES_LAYER)
  images = np.stack([
      np.repeat(common.ultrasound_like(rng, image_size)[..., None], 3, -1)
      for _ in range(count)])
  ways = {
      "predict": lambda: sub.predict(images, batch_size=batch_size,
                                     verbose=0),
      "traced_call": lambda: model_lib.in_batches(sub, images, batch_size,
                                                  traced=True),
  }
  outputs = {name: call() for name, call in ways.items()}  # warm-up
  seconds = {name: [] for name in ways}
  for _ in range(repeats):
    for name, call in ways.items():  # alternating: same machine load
      started = time.perf_counter()
      call()
      seconds[name].append(time.perf_counter() - started)
  rate = {name: count / statistics.median(s) for name, s in seconds.items()}
  views = 1 + config_lib.DEFAULT_AUGMENT_VIEWS
  return {
      "environment": common.environment(),
      "images": count, "batch_size": batch_size, "repeats": repeats,
      "image_size": image_size, "network_size": network_size,
      "backbone": backbone,
      "images_per_s": {k: round(v, 2) for k, v in rate.items()},
      "speedup": round(rate["traced_call"] / rate["predict"], 3),
      "max_abs_difference": float(np.abs(outputs["predict"] -
                                         outputs["traced_call"]).max()),
      "default_views": views,
      "projected_conv_pass_s": {
          "images": project_images,
          "predict": round(project_images * views / rate["predict"], 2),
          "traced_call": round(project_images * views /
                               rate["traced_call"], 2),
      },
  }


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
  args = parser.parse_args(argv)
  print(json.dumps(run(args.count, args.batch_size, args.repeats,
                       backbone_weights=args.backbone_weights,
                       project_images=args.project_images,
                       network_size=args.network_size), indent=2))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
