"""Cost of the image-quality checks against the decode they follow.

Per image, on one thread: `imaging.decode_and_resize` (what preprocessing
does to every member: PNG decode, INTER_AREA resize, grey kept 2-D) beside
`quality.check` on its output (the resized pixels and the original size),
for 500×500 PNGs of two kinds:
- grey: phantom scans (`training.phantoms`: tissue layers, speckle, a
  lesion), stored 2-D, the usual case; none fires a flag;
- colour: the same frames saved as RGB with red and blue blobs drawn on, as
  colour Doppler does; they stay three channels, and `check` also measures
  the channels' spread (the `colour` flag).
Medians of --repeats interleaved rounds after a warm-up; CPU milliseconds of
this process per image, and their ratio check / decode.
"""

import argparse
import json
from typing import Dict, List

import cv2
import numpy as np

import schemas
from bench import common
from busi_core import imaging, quality
from training import phantoms


def _pngs(kind: str, count: int, size: int) -> List[bytes]:
  rng = np.random.default_rng(0)
  out = []
  for i in range(count):
    img, _ = phantoms.render_phantom(schemas.LABELS[i % 3], rng, size)
    if kind == "colour":
      img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
      cv2.ellipse(img, (size // 3, size // 3), (size // 20, size // 40), 0, 0,
                  360, (0, 0, 230), -1)
      cv2.ellipse(img, (size // 2, size // 3), (size // 40, size // 60), 0,
                  0, 360, (230, 60, 0), -1)
    ok, buf = cv2.imencode(".png", img)
    assert ok
    out.append(buf.tobytes())
  return out


def run(count: int = 200, size: int = 500, image_size: int = 224,
        repeats: int = 7) -> Dict:
  """Measures both for each kind; returns the figures as a dict."""
  cv2.setNumThreads(1)
  figures = {"images": count, "png_size": size, "image_size": image_size,
             "repeats": repeats}
  for kind in ("grey", "colour"):
    blobs = _pngs(kind, count, size)
    decoded = [imaging.decode_and_resize(b, image_size, keep_grey=True)
               for b in blobs]  # also the warm-up
    fired = [quality.check(d.pixels, d.original_height, d.original_width)
             for d in decoded]

    def decode():
      for data in blobs:
        imaging.decode_and_resize(data, image_size, keep_grey=True)

    def check():
      for d in decoded:
        quality.check(d.pixels, d.original_height, d.original_width)

    decode_runs, check_runs = [], []
    for _ in range(repeats):  # interleaved: both see the same load drift
      decode_runs += common.timed(decode, 1)
      check_runs += common.timed(check, 1)
    decode_ms = 1000 * common.median(decode_runs, "cpu_s") / count
    check_ms = 1000 * common.median(check_runs, "cpu_s") / count
    figures[kind] = {
        "stored_channels": 1 if decoded[0].pixels.ndim == 2 else 3,
        "decode_and_resize_ms": round(decode_ms, 3),
        "quality_check_ms": round(check_ms, 4),
        "ratio_check_to_decode": round(check_ms / decode_ms, 4),
        "images_flagged": {name: sum(name in f for f in fired)
                           for name in sorted({n for f in fired for n in f})},
    }
  return figures


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--images", type=int, default=200)
  parser.add_argument("--size", type=int, default=500,
                      help="PNG height and width.")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args(argv)
  figures = run(args.images, args.size, args.image_size, args.repeats)
  print(json.dumps({"environment": common.environment(),
                    "quality": figures}, indent=2))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
