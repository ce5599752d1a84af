"""Preprocessing throughput per core against bare OpenCV decode + resize.

Both sides work on the same generated 500×500 grey PNGs in one zip (or, with
--png_channels 3, the same frames saved as RGB):
- bare: the zip's member bytes already in memory, `cv2.imdecode` + INTER_AREA
  resize + conversion to RGB on one thread (the stage stores grey frames
  without that conversion, which costs under 0.5 % of the bare time);
- stage: `python -m beam_pipeline preprocess` in this process (FnApiRunner,
  one worker), from the zip on disk to gzip TFRecords.
Per core = images per CPU-second of this process (all its threads), so the
figures compare work, not how many cores happened to be free. The first run
of each side is a warm-up (imports, TF start-up) and is excluded. The sides
run in interleaved rounds; the ratio is of their medians, and each round's
own ratio is listed to show the machine's noise.

A pipeline run has a fixed cost (building the graph, starting the runner,
finalising files) that large archives amortise. The stage is therefore run on
the whole zip and on a zip of its first quarter: the difference gives the
steady-state cost per image ("stage_*"), reported beside the fixed cost and
the whole-run figure that includes it.
"""

import argparse
import json
import os
import shutil
import tempfile
import zipfile
from typing import Dict

import cv2
import numpy as np

import schemas
from bench import common


def bare_decode(blobs, image_size: int) -> None:
  for data in blobs:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    img = cv2.resize(img, (image_size, image_size),
                     interpolation=cv2.INTER_AREA)
    cv2.cvtColor(img, cv2.COLOR_GRAY2RGB if img.ndim == 2 else
                 cv2.COLOR_BGR2RGB)


def _ratio(numerator: float, denominator: float, digits: int):
  """numerator / denominator, or None when the denominator (a difference of
  two timed runs) is not positive: too few images to rise above the noise."""
  return round(numerator / denominator, digits) if denominator > 0 else None


def run(workdir: str, count: int = 600, image_size: int = 224,
        repeats: int = 3, png_channels: int = 1) -> Dict:
  """Measures both sides; returns the figures as a dict.

  png_channels: 1 for grey PNGs, 3 for the same frames saved as RGB.
  """
  from beam_pipeline import pipeline  # pylint: disable=import-outside-toplevel
  cv2.setNumThreads(1)
  archive = os.path.join(workdir, "bench_pngs.zip")
  archive_bytes = common.write_png_zip(archive, count,
                                       channels=png_channels)
  small_count = max(1, count // 4)
  small = os.path.join(workdir, "bench_pngs_quarter.zip")
  common.write_png_zip(small, small_count, channels=png_channels)
  with zipfile.ZipFile(archive) as zf:
    blobs = [zf.read(info) for info in zf.infolist()]

  bare_decode(blobs[:20], image_size)  # warm-up

  def stage(path, expected):
    def go():
      out = os.path.join(workdir, "pre_out")
      shutil.rmtree(out, ignore_errors=True)
      manifest = pipeline.run([
          "preprocess", "--input", path, "--output", out, "--image_size",
          str(image_size), "--direct_num_workers", "1"])
      counts = manifest[schemas.MANIFEST_COUNTS]
      assert counts[schemas.COUNT_IMAGES_WRITTEN] == expected, manifest
    return go

  stage(small, small_count)()  # warm-up: imports, TensorFlow start-up
  # Interleaved (bare, full, quarter) rounds: a shared machine's load drifts,
  # and each side then sees the same drift.
  bare, full, part = [], [], []
  for _ in range(repeats):
    bare += common.timed(lambda: bare_decode(blobs, image_size), 1)
    full += common.timed(stage(archive, count), 1)
    part += common.timed(stage(small, small_count), 1)
  # A round whose full run took no more CPU than its quarter run (possible
  # on tiny inputs) has no meaningful ratio: None.
  per_round = [_ratio(b["cpu_s"] / count, (f["cpu_s"] - q["cpu_s"]) /
                      (count - small_count), 3)
               for b, f, q in zip(bare, full, part)]
  # Sorted, rounds too noisy for a ratio (None) last.
  per_round.sort(key=lambda r: (r is None, r or 0))
  bare_cpu = common.median(bare, "cpu_s") / count
  marginal_cpu = ((common.median(full, "cpu_s") - common.median(part, "cpu_s"))
                  / (count - small_count))
  marginal_wall = ((common.median(full, "wall_s") -
                    common.median(part, "wall_s")) / (count - small_count))
  fixed_cpu = common.median(full, "cpu_s") - marginal_cpu * count
  whole_cpu = common.median(full, "cpu_s") / count
  return {
      "images": count,
      "png_channels": png_channels,
      "archive_mb": round(archive_bytes / 1e6, 1),
      "image_size": image_size,
      "repeats": repeats,
      "bare_ms_per_image": round(1000 * bare_cpu, 3),
      "bare_images_per_s_per_core": round(1 / bare_cpu, 1),
      "stage_ms_per_image": round(1000 * marginal_cpu, 3),
      "stage_images_per_s_per_core": _ratio(1, marginal_cpu, 1),
      "stage_images_per_s_wall": _ratio(1, marginal_wall, 1),
      "ratio_stage_to_bare": _ratio(bare_cpu, marginal_cpu, 3),
      "ratio_stage_to_bare_each_round": per_round,
      "stage_fixed_cpu_s_per_run": round(fixed_cpu, 2),
      "whole_run_images_per_s_per_core": round(1 / whole_cpu, 1),
      "ratio_whole_run_to_bare": round(bare_cpu / whole_cpu, 3),
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--images", type=int, default=600)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--png_channels", type=int, choices=(1, 3), default=1,
                      help="1: grey PNGs; 3: grey frames saved as RGB.")
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory(prefix="busi-bench-") as workdir:
    figures = run(workdir, args.images, args.image_size, args.repeats,
                  args.png_channels)
  print(json.dumps({"environment": common.environment(),
                    "preprocess": figures}, indent=2))
  return 0


if __name__ == "__main__":
  import logging
  logging.basicConfig(level=logging.WARNING)
  raise SystemExit(main())
