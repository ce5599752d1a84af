"""End-to-end scoring throughput against the bare model, in one process.

- bare: the artifact's model called the fastest way we know (the compiled
  `tf.function` that the pipeline's inference function uses) on uint8 batches
  of the same decoded images, at several batch sizes; eager `model(x)` (Beam's
  default TF inference function) and `model.predict` beside it for reference.
- end-to-end: `python -m beam_pipeline score` on the DirectRunner's in-process
  runner, TFRecords → Parquet, same model and batch size.

Warm-up is excluded on both sides (first call traces; first pipeline run
imports and starts TensorFlow); figures are medians of repeated runs. The
pipeline is run on all images and on a quarter of them: the difference gives
the steady-state throughput; the whole-run figure (with model loading and
runner start-up) is reported beside it. Peak resident memory is measured on a
separate scoring run in a child process.

Without --backbone_weights the VGG16 has random weights: the same
computation as a trained one, so the same speed.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np

import schemas
from bench import common


def quarter_count(count: int, batch_size: int) -> int:
  """About a quarter of `count`, in whole batches, so that both runs pay
  for the same batch shapes and the difference is steady-state work."""
  return max(batch_size, (count // 4) // batch_size * batch_size)


def _make_data(workdir: str, count: int, image_size: int,
               batch_size: int) -> Dict[str, str]:
  from training import testing  # pylint: disable=import-outside-toplevel
  from schemas import records as records_lib  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  import cv2  # pylint: disable=import-outside-toplevel
  records = []
  for i in range(count):
    img = cv2.resize(common.ultrasound_like(rng, 500), (image_size,) * 2,
                     interpolation=cv2.INTER_AREA)
    # Stored grey, one channel, as preprocessing stores grey frames.
    records.append(records_lib.ImageRecord(
        image_id=f"{i:064x}", source=f"bench://{i}",
        label=schemas.LABELS[i % 3], pixels=img, original_height=500,
        original_width=500))
  paths = {}
  for name, subset in (("full", records),
                       ("quarter", records[:quarter_count(count,
                                                          batch_size)])):
    path = os.path.join(workdir, name, "part-00000-of-00001.tfrecord.gz")
    testing.write_tfrecords(path, subset)
    paths[name] = path
  paths["pixels"] = np.stack([cv2.cvtColor(r.pixels, cv2.COLOR_GRAY2RGB)
                              for r in records])
  return paths


def bare_model(model, pixels: np.ndarray, batch_sizes: List[int],
               repeats: int) -> Dict:
  """Images/s of the compiled call, eager call and predict, per batch size."""
  from busi_core.inference import compiled_call  # pylint: disable=import-outside-toplevel
  compiled = compiled_call(model)
  ways = {
      "compiled_tf_function": lambda x: compiled(x).numpy(),
      "eager_model_call": lambda x: np.asarray(model(x, training=False)),
      "keras_predict": lambda x: model.predict(x, batch_size=len(x),
                                               verbose=0),
  }
  out = {}
  for batch_size in batch_sizes:
    batches = [pixels[i:i + batch_size]
               for i in range(0, len(pixels) - batch_size + 1, batch_size)]
    row = {}
    for name, call in ways.items():
      if name != "compiled_tf_function" and batch_size != batch_sizes[-1]:
        continue  # references only at the pipeline's batch size
      call(batches[0])  # warm-up: tracing, oneDNN primitive creation

      def go():
        for b in batches:
          call(b)
      runs = common.timed(go, repeats)
      row[name] = round(len(batches) * batch_size /
                        common.median(runs, "wall_s"), 3)
    out[str(batch_size)] = row
  return out


def _score(paths, name, model_dir, out, batch_size):
  from beam_pipeline import pipeline  # pylint: disable=import-outside-toplevel
  shutil.rmtree(out, ignore_errors=True)
  return pipeline.run([
      "score", "--input", paths[name], "--model", model_dir, "--output", out,
      "--batch_size", str(batch_size), "--direct_num_workers", "1"])


def peak_rss_mb(paths, model_dir, workdir, batch_size) -> float:
  """Peak RSS of a whole `score` run in a child process."""
  out = os.path.join(workdir, "rss_out")
  before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  subprocess.run(
      [sys.executable, "-m", "beam_pipeline", "score", "--input",
       paths["full"], "--model", model_dir, "--output", out, "--batch_size",
       str(batch_size), "--direct_num_workers", "1"],
      check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  return round(max(before, after) / 1024, 1)


def run(workdir: str, count: int = 160, batch_size: int = 32,
        repeats: int = 3, model_dir: str = None, image_size: int = 224,
        batch_sizes=(8, 16, 32)) -> Dict:
  """Measures bare and end-to-end throughput; returns the figures.

  Args:
    workdir: scratch directory.
    count: images scored per full run.
    batch_size: the pipeline's batch size (bare is also measured at it).
    repeats: runs per measurement (medians reported).
    model_dir: a trained artifact; None builds VGG16 with random weights.
    image_size: for the random-weights VGG16.
    batch_sizes: further batch sizes for the bare compiled call.
  """
  from training import testing
  from busi_core import artifact  # pylint: disable=import-outside-toplevel
  if model_dir is None:
    model_dir = os.path.join(workdir, "model")
    testing.make_test_artifact(model_dir, image_size=image_size,
                               backbone="vgg16")
  loaded = artifact.load_artifact(model_dir)
  image_size = loaded.metadata.image_size
  if count % batch_size:
    raise ValueError(f"--images {count} must be a multiple of --batch_size"
                     f" {batch_size}: a short last batch runs slower")
  paths = _make_data(workdir, count, image_size, batch_size)
  sizes = sorted(set(batch_sizes) | {batch_size})
  sizes.remove(batch_size)
  sizes.append(batch_size)  # the pipeline's batch size last: references run
  bare = bare_model(loaded.model, paths["pixels"], sizes, repeats)
  out = os.path.join(workdir, "score_out")
  _score(paths, "quarter", model_dir, out, batch_size)  # warm-up
  full, part = [], []
  for _ in range(repeats):
    for name, runs in (("full", full), ("quarter", part)):
      t = time.perf_counter()
      manifest = _score(paths, name, model_dir, out, batch_size)
      runs.append({"wall_s": time.perf_counter() - t, "cpu_s": 0.0})
      counts = manifest[schemas.MANIFEST_COUNTS]
      assert counts[schemas.COUNT_ERRORS] == 0, manifest
  quarter = quarter_count(count, batch_size)
  steady = (count - quarter) / (common.median(full, "wall_s") -
                                common.median(part, "wall_s"))
  whole = count / common.median(full, "wall_s")
  bare_best = bare[str(batch_size)]["compiled_tf_function"]
  return {
      "images": count,
      "image_size": image_size,
      "batch_size": batch_size,
      "repeats": repeats,
      "model": loaded.metadata.model_version,
      "weights": loaded.metadata.weights_source,
      "bare_images_per_s": bare,
      "end_to_end_images_per_s_steady": round(steady, 3),
      "end_to_end_images_per_s_whole_run": round(whole, 3),
      "ratio_end_to_end_to_bare": round(steady / bare_best, 3),
      "ratio_whole_run_to_bare": round(whole / bare_best, 3),
      "peak_rss_mb_scoring_run": peak_rss_mb(paths, model_dir, workdir,
                                             batch_size),
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--images", type=int, default=160)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--model", default=None,
                      help="A trained artifact; default: VGG16, random weights.")
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory(prefix="busi-bench-") as workdir:
    figures = run(workdir, args.images, args.batch_size, args.repeats,
                  args.model, args.image_size)
  print(json.dumps({"environment": common.environment(), "scoring": figures},
                   indent=2))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
