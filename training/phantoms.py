"""Synthetic breast-ultrasound phantoms in the BUSI archive layout.

For demos and acceptance runs where the real dataset is not at hand: grey
B-mode-like frames with layered tissue, depth attenuation and multiplicative
(Rayleigh) speckle. Benign frames hold one smooth, wider-than-tall dark oval
with posterior enhancement; malignant ones an irregular, spiculated, very
dark lesion, often taller than wide, with posterior shadowing; normal ones
no lesion (thin dark ducts, as the other classes may also have).

The output is deterministic: each image depends only on (seed, class, N), and
the zip has fixed timestamps, so the same call writes the same bytes.
"""

import zipfile
from typing import Dict, List, Tuple

import cv2
import numpy as np

import schemas

ROOT = "Dataset_BUSI_with_GT"
# BUSI's member order: classes alphabetically, "x (N).png" then its mask.
_ARCHIVE_ORDER = ("benign", "malignant", "normal")
_EPOCH = (1980, 1, 1, 0, 0, 0)


def _smooth_field(rng: np.random.Generator, size: int, cells: int
                 ) -> np.ndarray:
  """Zero-mean, unit-ish random field varying over ~size/cells pixels."""
  coarse = rng.normal(size=(cells, cells)).astype(np.float32)
  return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


def _tissue(rng: np.random.Generator, size: int) -> np.ndarray:
  """Mean echogenicity (0..1) of the background: skin, fat, gland, chest."""
  depth = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None]
  # Layer boundaries wander a little across the frame.
  wobble = 0.03 * _smooth_field(rng, size, 4)[:1, :]
  skin = rng.uniform(0.03, 0.06)
  fat = rng.uniform(0.18, 0.3)
  gland = rng.uniform(0.62, 0.8)
  d = depth + wobble
  echo = np.where(d < skin, 0.95,
                  np.where(d < fat, 0.4,
                           np.where(d < gland, 0.7, 0.35)))
  echo = echo.astype(np.float32)
  echo += 0.12 * _smooth_field(rng, size, 6) + 0.06 * _smooth_field(
      rng, size, 20)
  # Thin bright Cooper's-ligament-like streaks.
  for _ in range(rng.integers(2, 6)):
    y = int(rng.uniform(fat, gland) * size)
    x0, x1 = sorted(rng.integers(0, size, 2))
    cv2.line(echo, (int(x0), y), (int(x1), y + int(rng.integers(-30, 30))),
             float(rng.uniform(0.8, 1.0)), int(rng.integers(1, 4)))
  attenuation = np.exp(-rng.uniform(0.6, 1.2) * depth)
  return np.clip(echo * attenuation, 0.02, 1.0)


def _ducts(rng: np.random.Generator, echo: np.ndarray, count: int) -> None:
  size = echo.shape[0]
  for _ in range(count):
    centre = (int(rng.uniform(0.2, 0.8) * size),
              int(rng.uniform(0.3, 0.7) * size))
    axes = (int(rng.uniform(0.06, 0.15) * size),
            int(rng.uniform(0.008, 0.02) * size))
    mask = np.zeros_like(echo)
    cv2.ellipse(mask, centre, axes, float(rng.uniform(-15, 15)), 0, 360, 1.0,
                -1)
    echo *= 1.0 - 0.5 * cv2.GaussianBlur(mask, (0, 0), 2.0)


def _oval(rng: np.random.Generator, size: int) -> Tuple[np.ndarray, dict]:
  """A circumscribed oval; a third are gently macrolobulated (fibroadenoma)."""
  mask = np.zeros((size, size), np.uint8)
  width = rng.uniform(0.06, 0.2) * size
  height = width / rng.uniform(1.2, 2.0)  # wider than tall: "parallel"
  centre = np.array([rng.uniform(0.3, 0.7) * size,
                     rng.uniform(0.35, 0.6) * size])
  tilt = np.radians(rng.uniform(-20, 20))
  angles = np.linspace(0, 2 * np.pi, 180, endpoint=False)
  r = np.ones_like(angles)
  if rng.uniform() < 0.35:
    for k in range(2, 5):
      r += rng.uniform(0.0, 0.06) * np.cos(k * angles + rng.uniform(0, 6.3))
  x, y = width * r * np.cos(angles), height * r * np.sin(angles)
  points = np.stack([x * np.cos(tilt) - y * np.sin(tilt),
                     x * np.sin(tilt) + y * np.cos(tilt)], 1) + centre
  cv2.fillPoly(mask, [points.astype(np.int32)], 255, cv2.LINE_AA)
  return mask, {"centre": (int(centre[0]), int(centre[1])), "width": width,
                "height": height}


def _spiculated(rng: np.random.Generator, size: int
               ) -> Tuple[np.ndarray, dict]:
  mask = np.zeros((size, size), np.uint8)
  radius = rng.uniform(0.06, 0.15) * size
  aspect = rng.uniform(0.7, 1.3)  # often taller than wide
  centre = np.array([rng.uniform(0.3, 0.7) * size,
                     rng.uniform(0.35, 0.6) * size])
  angles = np.linspace(0, 2 * np.pi, 180, endpoint=False)
  r = np.ones_like(angles)
  for k in range(2, 9):  # irregular, lobulated margin
    r += rng.uniform(0.03, 0.12) * np.cos(k * angles + rng.uniform(0, 6.3))
  r += 0.06 * rng.normal(size=angles.size)  # angular (not smooth) margin
  points = np.stack([radius * r * np.cos(angles) / aspect,
                     radius * r * np.sin(angles) * aspect], 1) + centre
  cv2.fillPoly(mask, [points.astype(np.int32)], 255, cv2.LINE_AA)
  # Spicules; some malignant masses have none, only the angular margin.
  for _ in range(rng.integers(0, 13)):
    theta = rng.uniform(0, 2 * np.pi)
    start = centre + 0.8 * radius * np.array([np.cos(theta), np.sin(theta)])
    length = radius * rng.uniform(0.4, 1.0)
    end = start + length * np.array([np.cos(theta), np.sin(theta)])
    cv2.line(mask, tuple(int(v) for v in start), tuple(int(v) for v in end),
             255, int(rng.integers(1, 4)), cv2.LINE_AA)
  return mask, {"centre": (int(centre[0]), int(centre[1])),
                "width": radius / aspect, "height": radius * aspect}


def _posterior(echo: np.ndarray, shape: dict, gain: float) -> None:
  """Brightens (gain > 1) or shadows (gain < 1) the column below a lesion."""
  size = echo.shape[0]
  cx, cy = shape["centre"]
  half = max(int(shape["width"] * 0.8), 2)
  top = min(int(cy + shape["height"] * 0.6), size - 1)
  band = np.zeros_like(echo)
  band[top:, max(cx - half, 0):cx + half] = 1.0
  band = cv2.GaussianBlur(band, (0, 0), max(half / 3, 1.0))
  echo *= 1.0 + (gain - 1.0) * band


def render_phantom(label: str, rng: np.random.Generator, size: int = 500
                  ) -> Tuple[np.ndarray, np.ndarray]:
  """One phantom frame and its lesion mask.

  Args:
    label: one of schemas.LABELS.
    rng: the image's random generator.
    size: height and width.

  Returns:
    (image, mask): uint8 [size, size] grey; mask 255 on the lesion, all 0 for
    "normal".
  """
  if label not in schemas.LABELS:
    raise ValueError(f"unknown class {label!r}; use one of {schemas.LABELS}")
  echo = _tissue(rng, size)
  _ducts(rng, echo, int(rng.integers(0, 4)))
  if label == "normal":
    mask = np.zeros((size, size), np.uint8)
  else:
    if label == "benign":
      mask, shape = _oval(rng, size)
      darkness, edge, gain = rng.uniform(0.55, 0.8), 2.5, rng.uniform(1.2, 1.5)
    else:
      mask, shape = _spiculated(rng, size)
      darkness, edge, gain = rng.uniform(0.7, 0.9), 1.0, rng.uniform(0.45, 0.7)
    _posterior(echo, shape, gain)
    soft = cv2.GaussianBlur(mask.astype(np.float32) / 255, (0, 0), edge)
    inside = 1.0 - darkness * soft
    if label == "malignant":  # heterogeneous interior echoes
      inside *= 1.0 + 0.25 * soft * _smooth_field(rng, size, 40)
    echo *= inside
  speckle = rng.rayleigh(1.0, size=(size, size)).astype(np.float32)
  # Speckle grains are longer laterally than axially.
  speckle = cv2.GaussianBlur(speckle, (0, 0), sigmaX=1.6, sigmaY=0.8)
  image = echo * speckle * (255 / 1.6)
  return np.clip(image, 0, 255).astype(np.uint8), mask


def _png(image: np.ndarray) -> bytes:
  ok, data = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
  if not ok:
    raise RuntimeError("PNG encoding failed")
  return data.tobytes()


def write_phantom_archive(path: str, n_per_class: Dict[str, int],
                          size: int = 500, seed: int = 0,
                          with_masks: bool = True) -> List[str]:
  """Writes a BUSI-layout zip of phantom frames.

  Members are `Dataset_BUSI_with_GT/<class>/<class> (N).png` (N from 1), each
  followed by `<class> (N)_mask.png` when `with_masks`.

  Args:
    path: the .zip to write (local).
    n_per_class: images per class, e.g. {"normal": 50, "benign": 50,
      "malignant": 50}; classes not named get none.
    size: frame height and width.
    seed: the images depend only on (seed, class, N).
    with_masks: also write the lesion masks, as BUSI has.

  Returns:
    The member names written, in archive order.

  Raises:
    ValueError: an unknown class or a negative count.
  """
  for label, count in n_per_class.items():
    if label not in schemas.LABELS or count < 0:
      raise ValueError(f"n_per_class {label!r}: {count}; classes are"
                       f" {schemas.LABELS} and counts must be >= 0")
  names = []
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    for label in _ARCHIVE_ORDER:
      class_index = schemas.LABELS.index(label)
      for n in range(1, n_per_class.get(label, 0) + 1):
        rng = np.random.default_rng([seed, class_index, n])
        image, mask = render_phantom(label, rng, size)
        members = [(f"{ROOT}/{label}/{label} ({n}).png", image)]
        if with_masks:
          members.append((f"{ROOT}/{label}/{label} ({n})_mask.png", mask))
        for name, pixels in members:
          info = zipfile.ZipInfo(name, date_time=_EPOCH)
          info.external_attr = 0o644 << 16
          zf.writestr(info, _png(pixels))
          names.append(name)
  return names
