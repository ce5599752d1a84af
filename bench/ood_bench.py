"""What the out-of-distribution score costs scoring, per image.

Scoring asks the artifact's network for the "features" layer beside the
probabilities (one forward pass; `busi_core.inference.predict`) and computes
the Mahalanobis distance on the host. This measures, on the same uint8
batches and in one process, alternating rounds:

- probabilities only: the compiled call of the plain model (what an artifact
  without a detector costs);
- probabilities + OOD score: `inference.predict` with a detector, i.e. the
  two-output compiled call plus the float64 quadratic form;
- the quadratic form alone, on the features of one batch.

Figures are medians over the rounds; the difference of the first two is the
detector's cost per image. Without --backbone_weights the VGG16 has random
weights (the same computation as a trained one, so the same speed).

  python -m bench.ood_bench [--count 96] [--repeats 5] [--backbone_weights H5]
"""

import argparse
import json
import statistics
import time
from typing import Dict, Optional

import numpy as np

import schemas
from bench import common


def run(count: int = 96, batch_size: int = 32, repeats: int = 5,
        image_size: int = 224, backbone: str = "vgg16",
        backbone_weights: Optional[str] = None) -> Dict:
  """Measures both ways on the same images; returns the figures."""
  from busi_core import inference, ood  # pylint: disable=import-outside-toplevel
  from training import model as model_lib  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  model = model_lib.build_model(
      image_size, backbone_weights or model_lib.NO_WEIGHTS,
      len(schemas.LABELS), backbone)
  images = np.stack([
      np.repeat(common.ultrasound_like(rng, image_size)[..., None], 3, -1)
      for _ in range(count)])
  batches = [images[i:i + batch_size] for i in range(0, count, batch_size)]
  features = model_lib.in_batches(
      model_lib.sub_model(model, None, schemas.FEATURES_LAYER), images,
      batch_size)
  detector, _ = ood.fit(features, schemas.OOD_TRANSFORM_SQRT_L2)
  plain = inference.scoring_model(model, None)
  with_ood = inference.scoring_model(model, detector._replace(threshold=1.0))
  one_batch = features[:batch_size]
  ways = {
      "probabilities_only": lambda b: inference.predict(plain, b),
      "probabilities_and_ood": lambda b: inference.predict(with_ood, b),
  }
  for call in ways.values():
    call(batches[0])  # warm-up: tracing, oneDNN primitive creation
  seconds = {name: [] for name in ways}
  for _ in range(repeats):
    for name, call in ways.items():  # alternating: same machine load
      started = time.perf_counter()
      for batch in batches:
        call(batch)
      seconds[name].append(time.perf_counter() - started)
  quadratic = common.timed(lambda: ood.scores(detector, one_batch),
                           max(20, repeats))
  ms = {name: 1000 * statistics.median(s) / count
        for name, s in seconds.items()}
  return {
      "environment": common.environment(),
      "images": count, "batch_size": batch_size, "repeats": repeats,
      "image_size": image_size, "backbone": backbone,
      "feature_dims": int(features.shape[1]),
      "ms_per_image": {k: round(v, 3) for k, v in ms.items()},
      "ood_cost_ms_per_image": round(ms["probabilities_and_ood"] -
                                     ms["probabilities_only"], 3),
      "ood_cost_ratio": round(ms["probabilities_and_ood"] /
                              ms["probabilities_only"], 4),
      "quadratic_form_ms_per_image": round(
          1000 * common.median(quadratic, "wall_s") / len(one_batch), 4),
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m bench.ood_bench",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--count", type=int, default=96)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--backbone_weights", default=None)
  args = parser.parse_args(argv)
  print(json.dumps(run(args.count, args.batch_size, args.repeats,
                       backbone_weights=args.backbone_weights), indent=2))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
