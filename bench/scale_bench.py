"""Large archives: speed-up from two workers, and memory flat in archive size.

Generates one large zip (default 2,000 images of 640×640, over 500 MB) and a
small one (a tenth), then runs `python -m beam_pipeline preprocess` in fresh
child processes:
- the large zip with 1 worker and with `--direct_num_workers 2
  --direct_running_mode multi_processing`: wall time and speed-up;
- peak resident memory (the largest single process: the launcher or one of
  its workers) for the large and the small zip, one worker each.

Every run starts a fresh interpreter, so each whole-run figure includes
start-up (imports, runner and worker processes); the steady-state speed-up
subtracts the small zip's run in the same mode, which has the same fixed
costs, from the large one's.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

from bench import common

_CHILD = r"""
import json, resource, sys, time
import schemas
from beam_pipeline import pipeline
t = time.perf_counter()
manifest = pipeline.run(sys.argv[1:])
wall = time.perf_counter() - t
own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"wall_s": wall, "peak_rss_mb": max(own, children) / 1024,
                  "launcher_rss_mb": own / 1024,
                  "images": manifest[schemas.MANIFEST_COUNTS][
                      schemas.COUNT_IMAGES_WRITTEN]}))
"""


def _preprocess(archive: str, out: str, image_size: int,
                extra: List[str]) -> Dict:
  argv = ["preprocess", "--input", archive, "--output", out, "--image_size",
          str(image_size), "--overwrite"] + extra
  done = subprocess.run([sys.executable, "-c", _CHILD] + argv, check=True,
                        capture_output=True, text=True)
  return json.loads(done.stdout.strip().splitlines()[-1])


def run(workdir: str, count: int = 2000, size: int = 640,
        image_size: int = 224, repeats: int = 2) -> Dict:
  big = os.path.join(workdir, "large.zip")
  small = os.path.join(workdir, "small.zip")
  t = time.perf_counter()
  big_bytes = common.write_png_zip(big, count, size=size, seed=1)
  small_bytes = common.write_png_zip(small, count // 10, size=size, seed=2)
  generated_s = time.perf_counter() - t
  out = os.path.join(workdir, "out")
  one = [_preprocess(big, out, image_size, ["--direct_num_workers", "1"])
         for _ in range(repeats)]
  two = [_preprocess(big, out, image_size,
                     ["--direct_num_workers", "2", "--direct_running_mode",
                      "multi_processing"]) for _ in range(repeats)]
  small_runs = [_preprocess(small, out, image_size,
                            ["--direct_num_workers", "1"])
                for _ in range(repeats)]
  small_two = [_preprocess(small, out, image_size,
                           ["--direct_num_workers", "2",
                            "--direct_running_mode", "multi_processing"])
               for _ in range(repeats)]
  for r in one + two:
    assert r["images"] == count, r
  one_wall = common.median(one, "wall_s")
  two_wall = common.median(two, "wall_s")
  # Steady state: the large run minus the small one (same fixed costs:
  # start-up, worker processes, planning, finalising files).
  steady_one = one_wall - common.median(small_runs, "wall_s")
  steady_two = two_wall - common.median(small_two, "wall_s")
  big_rss = common.median(one, "peak_rss_mb")
  small_rss = common.median(small_runs, "peak_rss_mb")
  return {
      "images": count,
      "image_px": size,
      "large_zip_mb": round(big_bytes / 1e6, 1),
      "small_zip_mb": round(small_bytes / 1e6, 1),
      "generation_s": round(generated_s, 1),
      "repeats": repeats,
      "one_worker_wall_s": round(one_wall, 2),
      "two_workers_multiprocessing_wall_s": round(two_wall, 2),
      "speed_up_two_workers": round(one_wall / two_wall, 3),
      "speed_up_two_workers_steady": round(steady_one / steady_two, 3),
      "one_worker_images_per_s": round(count / one_wall, 1),
      "two_workers_images_per_s": round(count / two_wall, 1),
      "peak_rss_mb_large_zip": round(big_rss, 1),
      "peak_rss_mb_small_zip": round(small_rss, 1),
      "peak_rss_ratio_large_to_small": round(big_rss / small_rss, 3),
      "peak_rss_mb_two_workers_largest_process": round(
          common.median(two, "peak_rss_mb"), 1),
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--images", type=int, default=2000)
  parser.add_argument("--size", type=int, default=640,
                      help="Side of the generated PNGs (640: ~250 KB each).")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--workdir", default=None,
                      help="Scratch directory (default: a temporary one).")
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory(prefix="busi-scale-",
                                   dir=args.workdir) as workdir:
    figures = run(workdir, args.images, args.size, repeats=args.repeats)
  print(json.dumps({"environment": common.environment(), "scale": figures},
                   indent=2))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
