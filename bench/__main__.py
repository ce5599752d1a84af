"""`python -m bench`: every performance figure in one run, as a table + JSON.

Sections (each also runnable alone, see its module):
- preprocess: images/s per core of the preprocessing stage beside bare OpenCV
  decode + resize of the same 500×500 PNGs (bench.preprocess_bench);
- scoring: the bare model called the fastest way at several batch sizes,
  end-to-end scoring TFRecords → Parquet on the DirectRunner, their ratio, and
  the scoring run's peak memory (bench.scoring_bench);
- precision: reduced-precision inference against float32 on a fixed set of
  images: max probability difference, changed predictions, speed;
- tfrecord: the fail-small TFRecord reader against Beam's, MB/s on gzip and
  plain shards, and shard sizes (bench.tfrecord_bench);
- codec: encode and decode of one Example per image, the generated message
  classes against the former hand-written encoder, and their share of the
  preprocessing stage's per-image work (bench.codec_bench);
- quality: the image-quality checks against the decode + resize they follow,
  per image (bench.quality_bench).

Warm-up runs are excluded everywhere and figures are medians of --repeats
runs. Without --model the VGG16 has random weights (same computation, same
speed as a trained one); accuracy-cost figures are then on random weights too,
so pass a trained artifact for meaningful ones.
"""

import argparse
import json
import os
import tempfile
import time
from typing import Dict

import numpy as np

from bench import (codec_bench, common, preprocess_bench, quality_bench,
                   scoring_bench, tfrecord_bench)


def precision_cost(model_dir: str, count: int = 64, repeats: int = 3,
                   batch_size: int = 32) -> Dict:
  """float32 against bfloat16/float16 on `count` fixed images."""
  import cv2  # pylint: disable=import-outside-toplevel
  from busi_core.inference import compiled_call  # pylint: disable=import-outside-toplevel
  from busi_core.precision import with_precision  # pylint: disable=import-outside-toplevel
  from busi_core import artifact  # pylint: disable=import-outside-toplevel
  loaded = artifact.load_artifact(model_dir)
  size = loaded.metadata.image_size
  rng = np.random.default_rng(42)
  images = np.stack([cv2.cvtColor(cv2.resize(
      common.ultrasound_like(rng, 500), (size, size),
      interpolation=cv2.INTER_AREA), cv2.COLOR_GRAY2RGB)
                     for _ in range(count)])
  batches = [images[i:i + batch_size] for i in range(0, count, batch_size)]

  def predict(model):
    call = compiled_call(model)
    call(batches[0])  # warm-up
    out = []
    runs = common.timed(lambda: out.append(
        np.concatenate([call(b).numpy() for b in batches])), repeats)
    return out[-1], count / common.median(runs, "wall_s")

  reference, reference_speed = predict(loaded.model)
  result = {"images": count, "float32_images_per_s": round(reference_speed,
                                                           3)}
  for precision in ("bfloat16", "float16"):
    try:
      probs, speed = predict(with_precision(loaded.model, precision))
    except Exception as e:  # pylint: disable=broad-except
      result[precision] = {"error": f"{type(e).__name__}: {e}"}
      continue
    result[precision] = {
        "images_per_s": round(speed, 3),
        "max_probability_difference": round(
            float(np.abs(probs - reference).max()), 5),
        "changed_predictions": int(
            (probs.argmax(1) != reference.argmax(1)).sum()),
    }
  return result


def _table(figures: Dict) -> str:
  pre = figures["preprocess"]
  sc = figures["scoring"]
  batch = str(sc["batch_size"])
  lines = [
      f"{'figure':<58} value",
      f"{'-' * 58} -----",
      f"{'preprocess: bare OpenCV decode+resize, images/s/core':<58} "
      f"{pre['bare_images_per_s_per_core']}",
      f"{'preprocess: stage steady state, images/s/core':<58} "
      f"{pre['stage_images_per_s_per_core']}",
      f"{'preprocess: ratio stage / bare':<58} {pre['ratio_stage_to_bare']}",
      f"{'preprocess: ratio incl. fixed start-up (' + str(pre['images']) + ' images)':<58} "
      f"{pre['ratio_whole_run_to_bare']}",
  ]
  for size, row in sc["bare_images_per_s"].items():
    for way, value in row.items():
      lines.append(f"{f'bare model, batch {size}, {way}, images/s':<58} {value}")
  lines += [
      f"{f'end-to-end scoring, batch {batch}, steady, images/s':<58} "
      f"{sc['end_to_end_images_per_s_steady']}",
      f"{'end-to-end / bare compiled (steady)':<58} "
      f"{sc['ratio_end_to_end_to_bare']}",
      f"{'end-to-end / bare compiled (whole run, with start-up)':<58} "
      f"{sc['ratio_whole_run_to_bare']}",
      f"{'scoring run peak RSS, MB':<58} {sc['peak_rss_mb_scoring_run']}",
  ]
  for kind in ("grey", "rgb"):
    row = figures.get("codec", {}).get(kind)
    if row:
      lines.append(f"{'codec ' + kind + ': encode ms, hand-written / generated':<58} "
                   f"{row['encode_ms']['hand_written']} / "
                   f"{row['encode_ms']['generated']}")
      lines.append(f"{'codec ' + kind + ': stage ms/image, hand-written / generated':<58} "
                   f"{row['stage_ms_per_image']['hand_written']} / "
                   f"{row['stage_ms_per_image']['generated']}")
  for kind in ("grey", "colour"):
    row = figures.get("quality", {}).get(kind)
    if row:
      lines.append(f"{'quality check ' + kind + ': ms, share of decode+resize':<58} "
                   f"{row['quality_check_ms']}, {row['ratio_check_to_decode']}")
  prec = figures.get("precision", {})
  for name in ("bfloat16", "float16"):
    row = prec.get(name, {})
    if "error" in row:
      lines.append(f"{name + ': ' + row['error'][:60]}")
    elif row:
      lines.append(f"{name + ' images/s (float32: ' + str(prec['float32_images_per_s']) + ')':<58} "
                   f"{row['images_per_s']}")
      lines.append(f"{name + ' max |p - p_float32| / changed predictions':<58} "
                   f"{row['max_probability_difference']} / "
                   f"{row['changed_predictions']} of {prec['images']}")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
  parser.add_argument("--output", default="bench_output/bench.json",
                      help="Where the JSON goes.")
  parser.add_argument("--model", default=None,
                      help="A trained artifact (default: VGG16, random"
                      " weights, 224×224).")
  # Preprocessing is fast: many images and repeats keep the steady-state
  # difference (full run minus quarter run) above this machine's noise.
  parser.add_argument("--preprocess_images", type=int, default=2000)
  parser.add_argument("--preprocess_repeats", type=int, default=5)
  parser.add_argument("--score_images", type=int, default=160,
                      help="A multiple of --batch_size.")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--skip", nargs="*", default=[],
                      choices=["preprocess", "scoring", "precision",
                               "tfrecord", "codec", "quality"])
  args = parser.parse_args(argv)
  started = time.time()
  figures = {"environment": {},
             "note": "warm-up excluded; medians of --repeats runs"}
  with tempfile.TemporaryDirectory(prefix="busi-bench-") as workdir:
    model_dir = args.model
    if model_dir is None:
      from training import testing  # pylint: disable=import-outside-toplevel
      model_dir = os.path.join(workdir, "vgg16_random")
      testing.make_test_artifact(model_dir, image_size=224, backbone="vgg16")
      figures["model"] = "VGG16 224x224, random weights (same compute)"
    else:
      figures["model"] = model_dir
    if "preprocess" not in args.skip:
      os.makedirs(os.path.join(workdir, "pre"))
      figures["preprocess"] = preprocess_bench.run(
          os.path.join(workdir, "pre"), args.preprocess_images,
          repeats=args.preprocess_repeats)
    if "scoring" not in args.skip:
      os.makedirs(os.path.join(workdir, "score"))
      figures["scoring"] = scoring_bench.run(
          os.path.join(workdir, "score"), args.score_images, args.batch_size,
          args.repeats, model_dir)
    if "precision" not in args.skip:
      figures["precision"] = precision_cost(model_dir, repeats=args.repeats,
                                            batch_size=args.batch_size)
    if "tfrecord" not in args.skip:
      os.makedirs(os.path.join(workdir, "tfrecord"))
      figures["tfrecord_read"] = tfrecord_bench.run(
          os.path.join(workdir, "tfrecord"), repeats=args.repeats)
    if "codec" not in args.skip:
      figures["codec"] = codec_bench.run(repeats=max(3, args.repeats))
    if "quality" not in args.skip:
      figures["quality"] = quality_bench.run(repeats=max(5, args.repeats))
  figures["environment"] = common.environment()  # as the runs left it
  figures["bench_wall_s"] = round(time.time() - started, 1)
  common.write_json(args.output, figures)
  print(json.dumps(figures["environment"]))
  if "preprocess" in figures and "scoring" in figures:
    print(_table(figures))
  else:
    print(json.dumps(figures, indent=2))
  print(f"JSON written to {args.output}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
