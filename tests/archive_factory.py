"""Builds small test archives whose every member's expected fate is known."""

import io
import tarfile
import zipfile
from typing import Dict, List, NamedTuple, Optional

import cv2
import numpy as np

import schemas
from training import phantoms


class Entry(NamedTuple):
  """One member to put in an archive, and what the pipeline must make of it."""
  path: str
  data: bytes
  fate: str  # "image", "mask" or "error"
  label: str = ""
  error_type: Optional[str] = None


def png(img: np.ndarray) -> bytes:
  ok, buf = cv2.imencode(".png", img)
  assert ok
  return buf.tobytes()


def jpeg(img: np.ndarray) -> bytes:
  ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
  assert ok
  return buf.tobytes()


def speckle(rng: np.random.Generator, h: int, w: int, channels: int = 0,
            dtype=np.uint8) -> np.ndarray:
  top = 65535 if dtype == np.uint16 else 255
  shape = (h, w) if channels == 0 else (h, w, channels)
  return rng.integers(0, top + 1, size=shape, dtype=np.int64).astype(dtype)


def phantom(seed: int, size: int = 500, label: str = "benign") -> np.ndarray:
  """A grey ultrasound-like frame (training.phantoms): fires no quality
  flag."""
  image, _ = phantoms.render_phantom(label, np.random.default_rng(seed), size)
  return image


def doppler(seed: int = 0) -> np.ndarray:
  """A phantom in BGR with red and blue flow blobs, as colour Doppler draws
  them: fires the quality flag 'colour'."""
  bgr = cv2.cvtColor(phantom(seed), cv2.COLOR_GRAY2BGR)
  cv2.ellipse(bgr, (200, 180), (22, 12), 0, 0, 360, (0, 0, 230), -1)
  cv2.ellipse(bgr, (240, 185), (12, 8), 0, 0, 360, (230, 60, 0), -1)
  return bgr


class QualityCase(NamedTuple):
  """A BUSI-layout image made to fire some quality flags."""
  entry: Entry
  flags: str  # what its record's quality_flags must be


def quality_cases() -> List[QualityCase]:
  """One image per quality flag, and a clean phantom."""
  ramp = np.tile(np.linspace(100, 140, 560), (480, 1)).astype(np.uint8)
  wide = cv2.resize(phantom(2), (1200, 300), interpolation=cv2.INTER_AREA)
  cases = (
      ("clean", phantom(1), ()),
      ("doppler", doppler(), (schemas.FLAG_COLOUR,)),
      ("blank", np.full((480, 560), 7, np.uint8),
       (schemas.FLAG_BLANK, schemas.FLAG_LOW_CONTRAST)),
      ("faint", ramp, (schemas.FLAG_LOW_CONTRAST,)),
      ("small", phantom(3, size=40), (schemas.FLAG_TINY,)),
      ("wide", wide, (schemas.FLAG_ASPECT_RATIO,)),
  )
  return [QualityCase(Entry(f"Dataset_BUSI_with_GT/benign/{name}.png",
                            png(img), "image", "benign"), ",".join(flags))
          for name, img, flags in cases]


def mixed_entries(seed: int = 0) -> List[Entry]:
  """Every kind of member the preprocessing stage must handle."""
  rng = np.random.default_rng(seed)
  root = "Dataset_BUSI_with_GT"
  entries = [
      Entry(f"{root}/benign/benign (1).png", png(speckle(rng, 40, 50)),
            "image", "benign"),
      Entry(f"{root}/benign/benign (1)_mask.png", png(speckle(rng, 40, 50)),
            "mask"),
      Entry(f"{root}/benign/benign (1)_mask_1.png", png(speckle(rng, 40, 50)),
            "mask"),
      Entry(f"{root}/malignant/malignant (1).png",
            png(speckle(rng, 30, 60, 3)), "image", "malignant"),
      Entry(f"{root}/malignant/malignant (2).png",
            png(speckle(rng, 33, 33, 4)), "image", "malignant"),
      Entry(f"{root}/normal/normal (1).png",
            png(speckle(rng, 50, 40, dtype=np.uint16)), "image", "normal"),
      Entry(f"{root}/normal/normal (2).jpg", jpeg(speckle(rng, 48, 64, 3)),
            "image", "normal"),
      Entry("export/2024/scan_0001.png", png(speckle(rng, 20, 70)), "image",
            ""),
      Entry(f"{root}/benign/deeper/nested/benign (9).JPG",
            jpeg(speckle(rng, 64, 48)), "image", "benign"),
      Entry(f"{root}/benign/broken.png", png(speckle(rng, 40, 40))[:60],
            "error", error_type="CorruptImage"),
      Entry(f"{root}/README.txt", b"BUSI dataset, see paper", "error",
            error_type="NotAnImage"),
  ]
  return entries


def busi_entries(n_per_class: int, seed: int = 0, shape=(45, 55),
                 second_mask: bool = True) -> List[Entry]:
  """BUSI layout: `<class>/<class> (N).png` with `_mask.png` beside each
  (and `_mask_1.png` beside the first of each class)."""
  import schemas  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  entries = []
  for cls in schemas.LABELS:
    for i in range(1, n_per_class + 1):
      stem = f"Dataset_BUSI_with_GT/{cls}/{cls} ({i})"
      entries.append(Entry(stem + ".png", png(speckle(rng, *shape)), "image",
                           cls))
      entries.append(Entry(stem + "_mask.png", png(speckle(rng, *shape)),
                           "mask"))
      if second_mask and i == 1:
        entries.append(Entry(stem + "_mask_1.png", png(speckle(rng, *shape)),
                             "mask"))
  return entries


def write_zip(path: str, entries: List[Entry], directories: bool = False
             ) -> None:
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
    if directories:
      for d in sorted({e.path.rsplit("/", 1)[0] + "/" for e in entries
                       if "/" in e.path}):
        zf.writestr(zipfile.ZipInfo(d), b"")
    for e in entries:
      zf.writestr(e.path, e.data)


def write_tar(path: str, entries: List[Entry], gz: bool = False) -> None:
  with tarfile.open(path, "w:gz" if gz else "w") as tf:
    for e in entries:
      info = tarfile.TarInfo(e.path)
      info.size = len(e.data)
      tf.addfile(info, io.BytesIO(e.data))


def expected_pixels(data: bytes, size: int) -> np.ndarray:
  """What OpenCV gives for the file: RGB, resized with INTER_AREA.

  Uses imread-style colour conversion (IMREAD_COLOR replicates grey and drops
  alpha), independent of the pipeline's own channel handling; 16-bit samples
  are scaled by 255/65535.
  """
  buf = np.frombuffer(data, np.uint8)
  probe = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
  if probe.dtype == np.uint16:
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)
    img = np.round(img.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)
  else:
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
  img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
  return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


def by_fate(entries: List[Entry]) -> Dict[str, List[Entry]]:
  out: Dict[str, List[Entry]] = {"image": [], "mask": [], "error": []}
  for e in entries:
    out[e.fate].append(e)
  return out
