"""Shared benchmark helpers: timing, environment description, test data."""

import json
import os
import platform
import statistics
import sys
import time
import zipfile
from typing import Callable, Dict, List

import numpy as np


def write_json(path: str, figures: Dict) -> None:
  """A bench's figures as indented JSON at `path` (its folder made)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(figures, f, indent=2)


def environment() -> Dict:
  """CPU model, core count and thread settings, printed with every figure."""
  cpu = platform.processor() or "unknown"
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  env = {
      "cpu": cpu,
      "cores": os.cpu_count(),
      "python": platform.python_version(),
      "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
      "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
  }
  # The settings in force, once the measured code has imported its libraries.
  if "cv2" in sys.modules:
    env["opencv_threads"] = sys.modules["cv2"].getNumThreads()
  if "tensorflow" in sys.modules:
    threading = sys.modules["tensorflow"].config.threading
    # 0 means TensorFlow's default: one thread per core.
    env["tf_intra_op_threads"] = threading.get_intra_op_parallelism_threads()
    env["tf_inter_op_threads"] = threading.get_inter_op_parallelism_threads()
  return env


def timed(fn: Callable[[], object], repeats: int) -> List[Dict[str, float]]:
  """Runs fn `repeats` times; wall and process CPU seconds of each run."""
  runs = []
  for _ in range(repeats):
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    runs.append({"wall_s": time.perf_counter() - wall,
                 "cpu_s": time.process_time() - cpu})
  return runs


def median(runs: List[Dict[str, float]], key: str) -> float:
  return statistics.median(r[key] for r in runs)


def ultrasound_like(rng: np.random.Generator, size: int) -> np.ndarray:
  """A grey speckle frame with a dark lesion: compresses like real scans."""
  import cv2  # pylint: disable=import-outside-toplevel
  img = rng.rayleigh(40.0, (size, size)).clip(0, 255).astype(np.uint8)
  img = cv2.GaussianBlur(img, (3, 3), 0)
  center = tuple(int(c) for c in rng.integers(size // 4, 3 * size // 4, 2))
  axes = tuple(int(a) for a in rng.integers(size // 12, size // 6, 2))
  cv2.ellipse(img, center, axes, float(rng.uniform(0, 180)), 0, 360, 15, -1)
  return img


def write_png_zip(path: str, count: int, size: int = 500, seed: int = 0,
                  channels: int = 1) -> int:
  """A zip of `count` size² PNGs in BUSI layout; returns its bytes.

  channels=1 writes grey PNGs; 3, the same grey frames saved as RGB (three
  equal channels), as some scanners and datasets ship them.
  """
  import cv2  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  classes = ("normal", "benign", "malignant")
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
    for i in range(count):
      cls = classes[i % 3]
      img = ultrasound_like(rng, size)
      if channels == 3:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
      ok, buf = cv2.imencode(".png", img)
      assert ok
      zf.writestr(f"Dataset_BUSI_with_GT/{cls}/{cls} ({i + 1}).png",
                  buf.tobytes())
  return os.path.getsize(path)
