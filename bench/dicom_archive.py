"""A zip of ultrasound DICOMs made from a BUSI-like zip of PNGs, for acceptance.

  python -m bench.dicom_archive --input BUSI.zip --output busi_dicom.zip \\
    [--count N] [--seed S] [--pydicom_corpus]

Each chosen PNG (`Dataset_BUSI_with_GT/benign/benign (1).png`; masks are
skipped) becomes `benign/benign (1).dcm`: the class folder survives, so
labels do. The image sits inside a padded canvas whose side panel holds a
bright ruler (tick marks and a scale bar) and whose margins hold a
burned-in-style banner; a SequenceOfUltrasoundRegions item (2D, tissue)
covers exactly the original image, so a reader that honours it gets the
PNG's pixels back and one that does not gets the panel too. Files mix
photometrics (MONOCHROME2/1, RGB planar 0/1, YBR_FULL, YBR_FULL_422,
PALETTE COLOR, 16-bit), transfer syntaxes (implicit/explicit little endian,
big endian, RLE, JPEG 2000 and JPEG-LS lossless, JPEG baseline), bare
datasets without preamble, and 3-frame cines (the same image three times);
every file carries the made-up patient data of `bench.dicom_writer.PHI`.

OUT.zip.json maps each member to its PNG (`original`), its frame count, the
crop box (top, bottom, left, right), and whether a reader must reproduce the
PNG exactly (`exact`; false for JPEG baseline and the YBR conversions, which
are within a few levels). With --pydicom_corpus every file of the test
corpus inside the installed pydicom package is added under
`pydicom_corpus/` (never downloaded), with `original` null.

Same input, count and seed: same bytes.
"""

import argparse
import io
import json
import os
import posixpath
import sys
import warnings
import zipfile
from typing import Dict, List, NamedTuple, Optional, Tuple

import cv2
import numpy as np
import pydicom
from pydicom import uid
from pydicom.uid import generate_uid

from bench import dicom_writer
from busi_core import imaging

CORPUS_FOLDER = "pydicom_corpus"
# Fixed member metadata: the zip's bytes depend on the contents alone.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_UNIX = 3
_MEMBER_MODE = 0o644 << 16


class Recipe(NamedTuple):
  """How one PNG is written as DICOM."""
  photometric: str
  transfer_syntax: str
  exact: bool  # a reader must give the PNG's pixels back unchanged
  bits_stored: int = 8
  planar: int = 0
  preamble: bool = True


# Cycled over the chosen images in a seeded order. Colour recipes take the
# PNG's RGB; grey ones its first channel when all three are equal (BUSI's
# PNGs are grey saved as RGB), else fall back to RGB.
RECIPES = (
    Recipe("MONOCHROME2", uid.ExplicitVRLittleEndian, True),
    Recipe("MONOCHROME2", uid.ImplicitVRLittleEndian, True),
    Recipe("MONOCHROME2", uid.RLELossless, True),
    Recipe("MONOCHROME2", uid.JPEGLSLossless, True),
    Recipe("MONOCHROME2", uid.JPEG2000Lossless, True),
    Recipe("MONOCHROME2", uid.ExplicitVRBigEndian, True),
    Recipe("MONOCHROME2", uid.ExplicitVRLittleEndian, True, bits_stored=16),
    Recipe("MONOCHROME2", uid.ImplicitVRLittleEndian, True, preamble=False),
    Recipe("MONOCHROME2", uid.JPEGBaseline8Bit, False),
    Recipe("MONOCHROME1", uid.ExplicitVRLittleEndian, True),
    Recipe("PALETTE COLOR", uid.ExplicitVRLittleEndian, True),
    Recipe("RGB", uid.ExplicitVRLittleEndian, True),
    Recipe("RGB", uid.ExplicitVRLittleEndian, True, planar=1),
    Recipe("RGB", uid.RLELossless, True),
    Recipe("YBR_FULL", uid.ExplicitVRLittleEndian, False),
    Recipe("YBR_FULL_422", uid.ExplicitVRLittleEndian, False),
    Recipe("YBR_FULL_422", uid.JPEGBaseline8Bit, False),
)
# Every this-many-th image is a 3-frame cine.
MULTI_FRAME_EVERY = 5
FRAMES = 3
# Images per made-up study.
STUDY_SIZE = 3
_GREY_RAMP = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)


def sidecar_path(output: str) -> str:
  return output + ".json"


def png_members(names: List[str]) -> List[str]:
  """The archive's PNG images, masks left out, in a fixed order."""
  return sorted(n for n in names
                if n.lower().endswith(".png") and not n.endswith("/")
                and not imaging.is_mask(n))


def dicom_member(png_member: str) -> str:
  """`Dataset_BUSI_with_GT/benign/x (1).png` → `benign/x (1).dcm`."""
  stem = posixpath.splitext(posixpath.basename(png_member))[0]
  label = imaging.label_from_path(png_member)
  return posixpath.join(label or "unlabelled", stem + ".dcm")


def canvas(image: np.ndarray, rng: np.random.Generator
           ) -> Tuple[np.ndarray, Tuple[int, int, int, int]]:
  """Pads `image` into a scanner-like screen; returns it and the image box.

  The box is (x0, y0, x1, y1), inclusive, as DICOM regions give it. Margins
  vary with `rng`; the side panel is a ruler of bright ticks and a scale
  bar, the top margin a bright banner, so uncropped pixels differ.
  """
  rows, columns = image.shape[:2]
  top = int(rng.integers(12, 40))
  bottom = int(rng.integers(8, 30))
  left = int(rng.integers(8, 30))
  panel = int(rng.integers(40, 80))
  shape = (rows + top + bottom, columns + left + panel) + image.shape[2:]
  screen = np.zeros(shape, image.dtype)
  white = np.iinfo(image.dtype).max  # 255, or 65535 for 16-bit grey
  screen[top:top + rows, left:left + columns] = image
  x = left + columns + 6  # the ruler, right of the image
  for y in range(top, top + rows, 10):
    length = 16 if (y - top) % 50 == 0 else 8
    screen[y:y + 2, x:x + length] = white
  screen[top:top + rows, x:x + 2] = white * 9 // 10
  screen[top + rows // 3:top + rows // 3 + 20, x + 24:x + 34] = white * 4 // 5
  screen[2:top - 4, left:left + min(columns, 120)] = white  # banner
  return screen, (left, top, left + columns - 1, top + rows - 1)


def _pixels_for(recipe: Recipe, rgb: np.ndarray) -> Tuple[Recipe, np.ndarray]:
  """The stored pixels of `rgb` for the recipe, and the recipe used."""
  is_grey = (np.array_equal(rgb[..., 0], rgb[..., 1]) and
             np.array_equal(rgb[..., 1], rgb[..., 2]))
  grey_recipe = recipe.photometric in ("MONOCHROME2", "MONOCHROME1",
                                       "PALETTE COLOR")
  if grey_recipe and not is_grey:
    recipe = recipe._replace(photometric="RGB", bits_stored=8)
    grey_recipe = False
  if not grey_recipe:
    if recipe.photometric == "YBR_FULL_422" and rgb.shape[1] % 2:
      rgb = np.concatenate([rgb, rgb[:, -1:]], axis=1)  # needs even width
    return recipe, rgb
  grey = rgb[..., 0]
  if recipe.photometric == "MONOCHROME1":
    return recipe, 255 - grey  # stored inverted; a reader inverts it back
  if recipe.bits_stored == 16:
    return recipe, grey.astype(np.uint16) * 257
  return recipe, grey


def convert(png: bytes, recipe: Recipe, frames: Optional[int],
            rng: np.random.Generator, study_uid: str, series_uid: str,
            burned_in: Optional[str]) -> Tuple[bytes, Dict]:
  """One PNG as a DICOM file, and its sidecar entry (less `original`)."""
  image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
  if image is None:
    raise ValueError("undecodable PNG")
  rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
  recipe, stored = _pixels_for(recipe, rgb)
  rows, columns = rgb.shape[:2]  # the original's size (before any padding)
  screen, (x0, y0, x1, y1) = canvas(stored, rng)
  x1 = x0 + columns - 1
  if recipe.photometric == "YBR_FULL_422" and screen.shape[1] % 2:
    screen = np.pad(screen, ((0, 0), (0, 1), (0, 0)))  # an even width
  regions = [(x0, y0, x1, y1, 1, 1),
             # A spectral-Doppler strip over the ruler: not 2D, never chosen.
             (x1 + 1, 0, screen.shape[1] - 1, screen.shape[0] - 1, 3, 3)]
  pixels = np.stack([screen] * frames) if frames else screen
  kwargs = {}
  if recipe.photometric == "PALETTE COLOR":
    kwargs = {"palette": _GREY_RAMP, "palette_bits": 16}
  data = dicom_writer.ultrasound_dicom(
      pixels, photometric=recipe.photometric, frames=frames, regions=regions,
      burned_in=burned_in, transfer_syntax=recipe.transfer_syntax,
      bits_stored=recipe.bits_stored, planar=recipe.planar,
      preamble=recipe.preamble, study_uid=study_uid,
      series_uid=series_uid, **kwargs)
  entry = {
      "frames": frames or 1,
      "photometric": recipe.photometric,
      "transfer_syntax": uid.UID(recipe.transfer_syntax).name,
      "bits_stored": recipe.bits_stored,
      "planar": recipe.planar,
      "preamble": recipe.preamble,
      "exact": recipe.exact,
      "region": [y0, y0 + rows, x0, x0 + columns],
      "canvas": list(screen.shape[:2]),
  }
  return data, entry


def corpus_files() -> List[Tuple[str, str]]:
  """(member, path) of every file of pydicom's bundled test corpus."""
  root = os.path.join(os.path.dirname(pydicom.__file__), "data",
                      "test_files")
  files = []
  for folder, _, names in os.walk(root):
    for name in names:
      if name.endswith((".py", ".pyc")):
        continue
      path = os.path.join(folder, name)
      relative = os.path.relpath(path, root).replace(os.sep, "/")
      files.append((posixpath.join(CORPUS_FOLDER, relative), path))
  return sorted(files)


def _corpus_frames(data: bytes) -> Optional[int]:
  """NumberOfFrames of a corpus file (1 when absent), None if not an image."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
      ds = pydicom.dcmread(io.BytesIO(data), force=True,
                           stop_before_pixels=True)
      if "Rows" not in ds:
        return None
      return int(ds.get("NumberOfFrames") or 1)
    except Exception:  # pylint: disable=broad-except
      return None  # not DICOM, or not parsable: the reader will say why


def _write(zf: zipfile.ZipFile, member: str, data: bytes) -> None:
  info = zipfile.ZipInfo(member, date_time=_ZIP_TIME)
  info.create_system = _UNIX
  info.external_attr = _MEMBER_MODE
  info.compress_type = zipfile.ZIP_DEFLATED
  zf.writestr(info, data)


def study_and_series_uids(seed: int, k: int) -> Tuple[str, str]:
  """The Study and Series Instance UIDs of the k-th converted image: every
  STUDY_SIZE images share a study; deterministic for a seed."""
  study = generate_uid(entropy_srcs=["bench.dicom_archive", str(seed),
                                     str(k // STUDY_SIZE)])
  return study, generate_uid(entropy_srcs=[study, "series"])


def build(input_zip: str, output: str, count: Optional[int] = None,
          seed: int = 0, pydicom_corpus: bool = False) -> Dict:
  """Writes the DICOM zip and its JSON sidecar.

  Args:
    input_zip: a zip of PNGs (BUSI-like: class folders, `_mask` files).
    output: the zip to write; the sidecar goes to OUTPUT.json.
    count: how many PNGs to convert (all when None).
    seed: chooses the PNGs, their recipes and canvases.
    pydicom_corpus: also add pydicom's bundled test files.

  Returns:
    The sidecar: {member: entry}.
  """
  rng = np.random.default_rng(seed)
  with zipfile.ZipFile(input_zip) as source:
    members = png_members(source.namelist())
    if count is not None and count < len(members):
      chosen = sorted(rng.choice(len(members), size=count, replace=False))
      members = [members[i] for i in chosen]
    # Each run of len(RECIPES) files uses every recipe once.
    order = np.concatenate([
        rng.permutation(len(RECIPES))
        for _ in range(len(members) // len(RECIPES) + 1)])
    sidecar: Dict[str, Dict] = {}
    partial = output + ".partial"
    with zipfile.ZipFile(partial, "w") as zf:
      for k, png_member in enumerate(members):
        member = dicom_member(png_member)
        if member in sidecar:  # same stem in two source folders
          stem, ext = posixpath.splitext(member)
          member = f"{stem} ({k}){ext}"
        recipe = RECIPES[order[k] % len(RECIPES)]
        frames = FRAMES if k % MULTI_FRAME_EVERY == MULTI_FRAME_EVERY - 1 \
            else None
        if frames and recipe.transfer_syntax == uid.JPEG2000Lossless:
          frames = None  # keep cines quick to write
        study, series = study_and_series_uids(seed, k)
        burned_in = ("YES", "NO", None)[k % 3]
        data, entry = convert(source.read(png_member), recipe, frames, rng,
                              study, series, burned_in)
        entry = {"original": png_member, "label":
                 imaging.label_from_path(png_member), **entry}
        _write(zf, member, data)
        sidecar[member] = entry
      if pydicom_corpus:
        for member, path in corpus_files():
          with open(path, "rb") as f:
            data = f.read()
          _write(zf, member, data)
          sidecar[member] = {"original": None,
                             "frames": _corpus_frames(data),
                             "source": "pydicom test corpus"}
  os.replace(partial, output)
  with open(sidecar_path(output), "w", encoding="utf-8", newline="\n") as f:
    json.dump(sidecar, f, indent=1, sort_keys=True)
    f.write("\n")
  return sidecar


def summary(sidecar: Dict) -> str:
  """Counts per recipe, for the console."""
  counts: Dict[str, int] = {}
  frames = 0
  for entry in sidecar.values():
    if entry.get("original") is None:
      key = "pydicom test corpus"
    else:
      key = (f"{entry['photometric']}, {entry['transfer_syntax']}"
             + (", 16-bit" if entry["bits_stored"] == 16 else "")
             + (", planar 1" if entry["planar"] else "")
             + ("" if entry["preamble"] else ", no preamble"))
      frames += entry["frames"] > 1
    counts[key] = counts.get(key, 0) + 1
  lines = [f"  {n:4d}  {key}" for key, n in sorted(counts.items())]
  lines.append(f"  {frames:4d}  of them {FRAMES}-frame cines")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m bench.dicom_archive",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--input", required=True,
                      help="Zip of PNGs (BUSI-like; masks are skipped).")
  parser.add_argument("--output", required=True,
                      help="Zip to write; the sidecar goes to OUTPUT.json.")
  parser.add_argument("--count", type=int, default=None,
                      help="Convert this many PNGs (default: all).")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--pydicom_corpus", action="store_true",
                      help="Also add pydicom's bundled test files under"
                      f" {CORPUS_FOLDER}/.")
  args = parser.parse_args(argv)
  if not args.output.endswith(".zip"):
    parser.error("--output must end in .zip")
  if args.count is not None and args.count < 0:
    parser.error("--count must be 0 or more")
  sidecar = build(args.input, args.output, args.count, args.seed,
                  args.pydicom_corpus)
  size = os.path.getsize(args.output)
  print(f"wrote {args.output} ({size / 1e6:.1f} MB, {len(sidecar)} members)"
        f" and {sidecar_path(args.output)}")
  print(summary(sidecar))
  return 0


if __name__ == "__main__":
  sys.exit(main())
