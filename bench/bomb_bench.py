"""Peak memory of a run over a zip whose member inflates to 4 GB.

Writes a zip with a few ordinary PNGs and one member of 4 GiB of zeros
(about 4 MB compressed: a zip bomb), then runs `python -m beam_pipeline
preprocess` over it in a fresh child process, once with the default limits
and once with the compression-ratio check switched off (so that only
`--max_member_bytes` stops it), and reports each run's peak resident memory
and what became of the bomb.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from typing import Dict, List

import numpy as np

import schemas
from bench import common

_CHILD = r"""
import json, resource, sys, time
import schemas
from beam_pipeline import pipeline
t = time.perf_counter()
manifest = pipeline.run(sys.argv[1:])
print(json.dumps({"wall_s": time.perf_counter() - t,
                  "peak_rss_mb": resource.getrusage(
                      resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "counts": manifest[schemas.MANIFEST_COUNTS]}))
"""


def write_bomb_zip(path: str, inflated_gib: float, images: int = 5) -> Dict:
  import cv2  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  block = b"\0" * (8 << 20)
  blocks = int(inflated_gib * (1 << 30)) // len(block)
  t = time.perf_counter()
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED,
                       compresslevel=1) as zf:
    for i in range(images):
      ok, buf = cv2.imencode(".png", common.ultrasound_like(rng, 500))
      zf.writestr(f"Dataset_BUSI_with_GT/benign/benign ({i + 1}).png",
                  buf.tobytes())
    with zf.open("Dataset_BUSI_with_GT/benign/bomb.png", "w",
                 force_zip64=True) as member:
      for _ in range(blocks):
        member.write(block)
  with zipfile.ZipFile(path) as zf:
    info = zf.getinfo("Dataset_BUSI_with_GT/benign/bomb.png")
  return {"zip_mb": round(os.path.getsize(path) / 1e6, 1),
          "bomb_inflated_gb": round(info.file_size / 1e9, 2),
          "bomb_compressed_mb": round(info.compress_size / 1e6, 2),
          "generation_s": round(time.perf_counter() - t, 1)}


def _preprocess(archive: str, out: str, extra: List[str]) -> Dict:
  argv = ["preprocess", "--input", archive, "--output", out, "--overwrite",
          "--direct_num_workers", "1"] + extra
  done = subprocess.run([sys.executable, "-c", _CHILD] + argv, check=True,
                        capture_output=True, text=True)
  result = json.loads(done.stdout.strip().splitlines()[-1])
  import duckdb  # pylint: disable=import-outside-toplevel
  rows = duckdb.connect().execute(
      f"SELECT {schemas.COLUMN_ERROR_TYPE}, {schemas.COLUMN_MESSAGE}"
      f" FROM read_parquet('{out}/{schemas.ERRORS_DIR}/*.parquet')"
      f" WHERE {schemas.COLUMN_SOURCE} LIKE '%bomb.png'").fetchall()
  result["bomb_error"] = rows[0][0] if rows else None
  result["bomb_message"] = rows[0][1] if rows else None
  result["peak_rss_mb"] = round(result["peak_rss_mb"], 1)
  result["wall_s"] = round(result["wall_s"], 2)
  return result


def run(workdir: str, inflated_gib: float = 4.0) -> Dict:
  archive = os.path.join(workdir, "bomb.zip")
  figures = write_bomb_zip(archive, inflated_gib)
  out = os.path.join(workdir, "out")
  figures["default_limits"] = _preprocess(archive, out, [])
  figures["ratio_check_off"] = _preprocess(
      archive, out, ["--max_compression_ratio", "1e12"])
  return figures


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--inflated_gib", type=float, default=4.0)
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory(prefix="busi-bomb-") as workdir:
    figures = run(workdir, args.inflated_gib)
  print(json.dumps({"environment": common.environment(), "zip_bomb": figures},
                   indent=2))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
