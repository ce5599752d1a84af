"""A zip of images that are not breast ultrasound, to test the OOD detector.

Gathers, from data that Python packages ship (never the network), images of
kinds a breast-ultrasound model should refuse: photographs, scanned and
rendered documents, charts, UI screenshots, CT/MR/NM slices, faces,
histology, retina. Each comes from a different source. Writes them as PNGs
under `other/` (a folder that names no class, so preprocessing leaves them
unlabelled) into PATH.zip, and PATH.manifest.tsv beside it (member, kind,
origin); prints the count per kind. Same packages, same bytes.

  python -m bench.non_us_archive --output non_us.zip [--extra_packages DIR]

matplotlib and Pillow alone make 23 images. scikit-image, scikit-learn and
pydicom add 42 more (65 in all) from their bundled data; the project never
requires them. Install them apart from the project's environment with

  pip install --target DIR scikit-image pydicom scikit-learn

and pass DIR as --extra_packages (searched after the environment, so its
numpy and Pillow win). A missing package or file is skipped with a note.
Only pixels go into the PNGs: pydicom's test files carry made-up patient
names in their headers, which are neither copied nor printed; the manifest
names the test file only.

Then measure a model's detector on them:

  python -m beam_pipeline preprocess --input non_us.zip --output NONUS_DIR
  python -m training evaluate --model MODEL_DIR --output REPORT_DIR \\
    --data "BUSI_DIR/tfrecords/*.tfrecord.gz" \\
    --ood "NONUS_DIR/tfrecords/*.tfrecord.gz"
"""

import argparse
import collections
import gzip
import importlib.util
import io
import json
import os
import sys
import textwrap
import warnings
import zipfile
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FOLDER = "other"
# Fixed member metadata: the zip's bytes depend on the images alone.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_UNIX = 3
_MEMBER_MODE = 0o644 << 16


class Item(NamedTuple):
  """One image of the archive."""
  name: str  # member stem, unique
  kind: str  # colour_photo, ct_mr, text_document, ...
  origin: str  # where it comes from; never anything read from a header
  image: Image.Image  # mode L or RGB, pixels only


def _item(name: str, kind: str, origin: str, image) -> Item:
  """An Item holding only the pixels of `image` (array or PIL image)."""
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  if image.mode not in ("L", "RGB"):
    image = image.convert("RGB")
  # A fresh image drops EXIF, ICC profiles and text chunks of the source.
  return Item(name, kind, origin,
              Image.frombytes(image.mode, image.size, image.tobytes()))


def to_uint8(array: np.ndarray) -> np.ndarray:
  """Min/max window of any numeric array to 0-255."""
  a = array.astype(np.float64)
  lo, hi = np.nanmin(a), np.nanmax(a)
  return ((a - lo) / max(hi - lo, 1e-9) * 255).round().astype(np.uint8)


def _open(path: str) -> Image.Image:
  with Image.open(path) as image:
    image.load()
    return image.copy()


def _package_dir(module: str) -> Optional[str]:
  """Directory of an installed package, found without importing it."""
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    return None
  return list(spec.submodule_search_locations)[0]


# --- scikit-image: the files in skimage/data (those that need no download)

_SKIMAGE = (
    ("astronaut.png", "colour_photo", "skimage.data.astronaut"),
    ("camera.png", "grey_photo", "skimage.data.camera"),
    ("coffee.png", "colour_photo", "skimage.data.coffee"),
    ("chelsea.png", "colour_photo", "skimage.data.chelsea (cat)"),
    ("coins.png", "grey_photo", "skimage.data.coins"),
    ("moon.png", "grey_photo", "skimage.data.moon"),
    ("rocket.jpg", "colour_photo", "skimage.data.rocket"),
    ("horse.png", "graphic", "skimage.data.horse (binary silhouette)"),
    ("hubble_deep_field.jpg", "colour_photo",
     "skimage.data.hubble_deep_field"),
    ("motorcycle_left.png", "colour_photo",
     "skimage.data.stereo_motorcycle left"),
    ("clock_motion.png", "grey_photo", "skimage.data.clock"),
    ("brick.png", "grey_photo", "skimage.data.brick (texture)"),
    ("grass.png", "grey_photo", "skimage.data.grass (texture)"),
    ("gravel.png", "grey_photo", "skimage.data.gravel (texture)"),
    ("text.png", "text_document", "skimage.data.text (photo of text)"),
    ("page.png", "text_document", "skimage.data.page (scanned page)"),
    ("ihc.png", "histology_microscopy", "skimage.data.immunohistochemistry"),
    ("cell.png", "histology_microscopy", "skimage.data.cell (microscopy)"),
    ("retina.jpg", "medical_other", "skimage.data.retina (fundus photo)"),
    ("microaneurysms.png", "medical_other",
     "skimage.data.microaneurysms (retinal, grey)"),
    ("phantom.png", "ct_mr", "skimage.data.shepp_logan_phantom (CT phantom)"),
    ("color.png", "graphic", "skimage.data.colorwheel"),
    ("logo.png", "graphic", "skimage.data.logo"),
    ("chessboard_GRAY.png", "graphic", "skimage.data.checkerboard"),
)
_LFW_FACES = (0, 17, 34, 51, 68, 85)  # lfw_subset.npy: the first 100 are faces


def skimage_images(package: str, notes: List[str]) -> List[Item]:
  """scikit-image's bundled sample images, read as files (no fetcher)."""
  data = os.path.join(package, "data")
  items = []
  for file, kind, origin in _SKIMAGE:
    path = os.path.join(data, file)
    if not os.path.exists(path):
      notes.append(f"scikit-image: {file} not bundled (needs a download)")
      continue
    items.append(_item("sk_" + os.path.splitext(file)[0], kind, origin,
                       _open(path)))
  gif = os.path.join(data, "no_time_for_that_tiny.gif")
  if os.path.exists(gif):
    with Image.open(gif) as image:
      image.seek(0)
      items.append(_item(
          "sk_no_time_for_that", "graphic",
          "skimage.data (no_time_for_that_tiny.gif frame 0, cartoon)",
          image.convert("RGB")))
  else:
    notes.append("scikit-image: no_time_for_that_tiny.gif not bundled")
  lfw = os.path.join(data, "lfw_subset.npy")
  if os.path.exists(lfw):
    faces = np.load(lfw)  # 200 × 25×25 floats
    items.extend(_item(f"sk_lfw_face{i:03d}", "face",
                       f"skimage.data.lfw_subset[{i}] (25x25 face)",
                       to_uint8(faces[i])) for i in _LFW_FACES)
  else:
    notes.append("scikit-image: lfw_subset.npy not bundled")
  return items


# --- scikit-learn: load_sample_images' two JPEGs


def sklearn_images(package: str, notes: List[str]) -> List[Item]:
  """The two photographs of sklearn.datasets.load_sample_images."""
  items = []
  for file in ("china.jpg", "flower.jpg"):
    path = os.path.join(package, "datasets", "images", file)
    if not os.path.exists(path):
      notes.append(f"scikit-learn: {file} not bundled")
      continue
    items.append(_item("skl_" + os.path.splitext(file)[0], "colour_photo",
                       f"sklearn.datasets.load_sample_images {file}",
                       _open(path)))
  return items


# --- pydicom: test files that are not ultrasound; pixels only

_DICOM = (
    ("CT_small.dcm", "ct_mr", "CT"),
    ("693_J2KI.dcm", "ct_mr", "CT 512x512"),
    ("J2K_pixelrep_mismatch.dcm", "ct_mr", "CT 512x512"),
    ("MR_small.dcm", "ct_mr", "MR"),
    ("examples_overlay.dcm", "ct_mr", "MR"),
    ("JPEG2000.dcm", "ct_mr", "NM whole-body"),
    ("image_dfl.dcm", "ct_mr", "OT 512x512"),
    ("SC_jpeg_no_color_transform.dcm", "graphic", "secondary capture RGB"),
    ("SC_rgb_rle.dcm", "graphic", "colour test bars"),
)


def dicom_slices(package: str, notes: List[str]) -> List[Item]:
  """pydicom's CT, MR, NM and secondary-capture test files, min/max window.

  Reads the files in the package's data/test_files directly:
  `pydicom.data.get_testdata_file` may download the ones not bundled.
  """
  import pydicom  # pylint: disable=import-outside-toplevel
  items = []
  for file, kind, what in _DICOM:
    path = os.path.join(package, "data", "test_files", file)
    if not os.path.exists(path):
      notes.append(f"pydicom: {file} not bundled")
      continue
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pixels = pydicom.dcmread(path).pixel_array
    except Exception as e:  # pylint: disable=broad-except
      # The type alone: a message could quote the header.
      notes.append(f"pydicom: {file} not decoded ({type(e).__name__})")
      continue
    if pixels.ndim == 3 and pixels.shape[-1] != 3:
      pixels = pixels[0]  # multi-frame: the first frame
    items.append(_item("dcm_" + os.path.splitext(file)[0], kind,
                       f"pydicom {file} ({what})", to_uint8(pixels)))
  return items


# --- matplotlib: its sample data and four rendered charts


def matplotlib_samples(notes: List[str]) -> List[Item]:
  """The images and rasters in matplotlib's mpl-data/sample_data."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  data = os.path.join(matplotlib.get_data_path(), "sample_data")
  makers = (
      ("grace_hopper.jpg", "mpl_grace_hopper", "face", "", _open),
      ("Minduka_Present_Blue_Pack.png", "mpl_minduka", "colour_photo", "",
       _open),
      ("logo2.png", "mpl_logo2", "graphic", "", _open),
      ("s1045.ima.gz", "mpl_s1045_mri", "ct_mr",
       " (MR slice, min/max window)", _mr_slice),
      ("jacksboro_fault_dem.npz", "mpl_jacksboro_dem", "graphic",
       " (elevation as grey)",
       lambda p: to_uint8(_npz_first(p, "elevation"))),
      ("topobathy.npz", "mpl_topobathy", "graphic", "[topo] (as grey)",
       lambda p: to_uint8(_npz_first(p, "topo"))),
  )
  items = []
  for file, name, kind, detail, read in makers:
    path = os.path.join(data, file)
    if not os.path.exists(path):
      notes.append(f"matplotlib: sample_data/{file} not bundled")
      continue
    items.append(_item(name, kind, f"matplotlib sample_data {file}{detail}",
                       read(path)))
  return items


def _mr_slice(path: str) -> np.ndarray:
  with gzip.open(path) as f:
    return to_uint8(np.frombuffer(f.read(), "<u2").reshape(256, 256))


def _npz_first(path: str, key: str) -> np.ndarray:
  with np.load(path) as arrays:
    return arrays[key]


def matplotlib_charts(notes: List[str]) -> List[Item]:
  """Line, bar, scatter and pie charts in matplotlib's default style."""
  del notes  # nothing here can be missing
  # pylint: disable=import-outside-toplevel
  import matplotlib.style
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  def render(size: Tuple[int, int], draw: Callable) -> Image.Image:
    # Default style, no pyplot: neither a matplotlibrc nor the global
    # backend changes the pixels.
    with matplotlib.style.context("default"):
      fig = Figure(figsize=size, dpi=100)
      canvas = FigureCanvasAgg(fig)
      draw(fig.subplots(), np.random.default_rng(0))
      canvas.draw()
      return Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB")

  def line(ax, rng):
    del rng
    x = np.linspace(0, 10, 200)
    for s in range(3):
      ax.plot(x, np.sin(x + s) * (s + 1), label=f"series {s}")
    ax.legend()
    ax.set_title("Line chart")
    ax.grid(True)

  def bar(ax, rng):
    ax.bar(list("ABCDEFG"), rng.integers(3, 30, 7), color="tab:orange")
    ax.set_title("Quarterly sales")

  def scatter(ax, rng):
    ax.scatter(rng.normal(size=300), rng.normal(size=300), c=rng.random(300),
               cmap="viridis")
    ax.set_title("Scatter")

  def pie(ax, rng):
    del rng
    ax.pie([35, 25, 20, 20], labels=["a", "b", "c", "d"], autopct="%1.0f%%")

  return [
      _item("mpl_line_chart", "chart", "matplotlib rendered line chart",
            render((6, 4), line)),
      _item("mpl_bar_chart", "chart", "matplotlib rendered bar chart",
            render((5, 5), bar)),
      _item("mpl_scatter", "chart", "matplotlib rendered scatter plot",
            render((5, 5), scatter)),
      _item("mpl_pie", "chart", "matplotlib rendered pie chart",
            render((5, 5), pie)),
  ]


# --- Pillow: documents and screens drawn with matplotlib's DejaVu fonts

_LOREM = (
    "The quarterly report summarises the operational results of the"
    " department. Revenue grew in all regions, while costs were held flat"
    " through careful procurement. The committee recommends continuing the"
    " current strategy and reviewing it in six months. All figures are"
    " unaudited and subject to change after the annual review. ") * 4


def _font_loader() -> Callable[[str, int], ImageFont.FreeTypeFont]:
  import matplotlib  # pylint: disable=import-outside-toplevel
  fonts = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")

  def font(name: str, size: int) -> ImageFont.FreeTypeFont:
    # BASIC layout: the same glyph positions whether or not libraqm is there.
    return ImageFont.truetype(os.path.join(fonts, name), size,
                              layout_engine=ImageFont.Layout.BASIC)
  return font


def _page(font: Callable, font_name: str, size: int, width_chars: int,
          bg="white", fg="black", title: Optional[str] = None,
          wh: Tuple[int, int] = (850, 1100)) -> Image.Image:
  """A page of wrapped text, as much as fits."""
  im = Image.new("RGB", wh, bg)
  d = ImageDraw.Draw(im)
  y = 60
  if title:
    d.text((60, y), title, font=font("DejaVuSans-Bold.ttf", size * 2), fill=fg)
    y += size * 3
  for para in _LOREM.split(". "):
    for line in textwrap.wrap(para + ".", width_chars):
      d.text((60, y), line, font=font(font_name, size), fill=fg)
      y += int(size * 1.4)
      if y > wh[1] - 60:
        break
    y += size
    if y > wh[1] - 60:
      break
  return im


def _table(font: Callable) -> Image.Image:
  im = Image.new("RGB", (900, 600), "white")
  d = ImageDraw.Draw(im)
  f = font("DejaVuSans.ttf", 15)
  cols = ["Item", "Qty", "Price", "Total", "Date"]
  for r in range(20):
    row = cols if r == 0 else [
        f"Part {r:03d}", str(r * 3 % 17), f"{r * 1.75:.2f}",
        f"{r * r * 0.5:.2f}", f"2024-0{1 + r % 9}-1{r % 10}"]
    for c in range(5):
      x0, y0 = 40 + c * 165, 30 + r * 27
      d.rectangle([x0, y0, x0 + 165, y0 + 27], outline="black",
                  fill=(220, 230, 250) if r == 0 else None)
      d.text((x0 + 6, y0 + 5), row[c], font=f, fill="black")
  return im


def _spreadsheet(font: Callable) -> Image.Image:
  im = Image.new("RGB", (1000, 650), "white")
  d = ImageDraw.Draw(im)
  f = font("DejaVuSansCondensed.ttf", 12)
  for r in range(30):
    for c in range(10):
      x0, y0 = 30 + c * 95, 20 + r * 20
      d.rectangle([x0, y0, x0 + 95, y0 + 20], outline=(190, 190, 190),
                  fill=(33, 115, 70) if r == 0 else None)
      d.text((x0 + 4, y0 + 3),
             chr(65 + c) if r == 0 else f"{(r * 37 + c * 11) % 1000}",
             font=f, fill="white" if r == 0 else "black")
  return im


def _settings_ui(font: Callable) -> Image.Image:
  im = Image.new("RGB", (1024, 700), (240, 240, 240))
  d = ImageDraw.Draw(im)
  d.rectangle([0, 0, 1024, 40], fill=(60, 90, 160))
  d.text((15, 10), "Patient Portal - Settings",
         font=font("DejaVuSans-Bold.ttf", 18), fill="white")
  d.rectangle([0, 40, 200, 700], fill=(225, 228, 235))
  for i, t in enumerate(["Dashboard", "Messages", "Appointments", "Billing",
                         "Profile", "Help"]):
    d.text((20, 70 + i * 40), t, font=font("DejaVuSans.ttf", 16),
           fill=(30, 30, 30))
  for i in range(5):
    y = 80 + i * 100
    d.text((240, y), f"Option {i + 1}: enable notification channel",
           font=font("DejaVuSans.ttf", 16), fill="black")
    d.rounded_rectangle([240, y + 30, 700, y + 62], 6,
                        outline=(150, 150, 150), fill="white")
    d.rounded_rectangle([730, y + 30, 860, y + 62], 8, fill=(60, 130, 220))
    d.text((765, y + 37), "Save", font=font("DejaVuSans-Bold.ttf", 15),
           fill="white")
  return im


def _dark_chat(font: Callable) -> Image.Image:
  im = Image.new("RGB", (800, 900), (24, 26, 32))
  d = ImageDraw.Draw(im)
  for i in range(9):
    left = i % 2 == 0
    y = 30 + i * 95
    box = [30, y, 480, y + 70] if left else [320, y, 770, y + 70]
    d.rounded_rectangle(box, 14, fill=(55, 60, 75) if left else (30, 110, 200))
    d.text((box[0] + 15, y + 12), textwrap.shorten(_LOREM[i * 40:], 48),
           font=font("DejaVuSans.ttf", 15), fill="white")
  return im


def _form(font: Callable) -> Image.Image:
  im = Image.new("RGB", (850, 1100), "white")
  d = ImageDraw.Draw(im)
  d.text((60, 50), "APPLICATION FORM", font=font("DejaVuSans-Bold.ttf", 30),
         fill="black")
  for i, t in enumerate(["Name", "Address", "City", "Postcode", "Phone",
                         "Email", "Date of birth", "Signature"]):
    y = 140 + i * 110
    d.text((60, y), t, font=font("DejaVuSans.ttf", 18), fill="black")
    d.line([60, y + 60, 790, y + 60], fill="black", width=2)
  return im


def _receipt(font: Callable) -> Image.Image:
  im = Image.new("L", (380, 900), 255)
  d = ImageDraw.Draw(im)
  f = font("DejaVuSansMono.ttf", 16)
  for i in range(32):
    d.text((20, 20 + i * 27),
           f"ITEM {i:02d} ........ {i * 1.99:6.2f}" if i % 8 else "-" * 30,
           font=f, fill=0)
  return im


def _slide(font: Callable) -> Image.Image:
  im = Image.new("RGB", (1280, 720), (250, 250, 255))
  d = ImageDraw.Draw(im)
  d.rectangle([0, 0, 1280, 120], fill=(200, 40, 60))
  d.text((50, 30), "Project roadmap 2025",
         font=font("DejaVuSans-Bold.ttf", 48), fill="white")
  for i, t in enumerate(["Ship v2 of the platform", "Hire two engineers",
                         "Reduce costs by 10%", "Open the Berlin office"]):
    d.ellipse([70, 190 + i * 110, 90, 210 + i * 110], fill=(200, 40, 60))
    d.text((110, 180 + i * 110), t, font=font("DejaVuSans.ttf", 36),
           fill=(30, 30, 30))
  return im


def _sign(font: Callable) -> Image.Image:
  im = Image.new("RGB", (800, 400), (255, 220, 0))
  ImageDraw.Draw(im).text((60, 120), "STOP HERE",
                          font=font("DejaVuSans-Bold.ttf", 110), fill="black")
  return im


def rendered_documents(notes: List[str]) -> List[Item]:
  """Text pages, tables, forms and screens drawn with Pillow."""
  del notes  # the DejaVu fonts ship with matplotlib
  font = _font_loader()
  pages = (
      ("pil_doc_serif", "PIL rendered text page, serif 16pt",
       dict(font_name="DejaVuSerif.ttf", size=16, width_chars=80,
            title="Annual Report")),
      ("pil_doc_sans_large", "PIL rendered text page, sans 28pt",
       dict(font_name="DejaVuSans.ttf", size=28, width_chars=45)),
      ("pil_doc_mono_code", "PIL rendered monospace page (code-like)",
       dict(font_name="DejaVuSansMono.ttf", size=14, width_chars=95,
            bg=(250, 250, 240))),
      ("pil_doc_dark", "PIL rendered text, light on dark",
       dict(font_name="DejaVuSans.ttf", size=18, width_chars=70,
            bg=(30, 30, 30), fg=(220, 220, 220), wh=(1000, 700))),
      ("pil_doc_landscape_small", "PIL rendered small text landscape",
       dict(font_name="DejaVuSans.ttf", size=11, width_chars=160,
            wh=(1200, 800))),
  )
  items = [_item(name, "text_document", origin, _page(font, **kwargs))
           for name, origin, kwargs in pages]
  drawn = (
      ("pil_table", "text_document", "PIL rendered table (invoice-like grid)",
       _table),
      ("pil_spreadsheet", "text_document", "PIL rendered spreadsheet",
       _spreadsheet),
      ("pil_ui_screenshot", "ui_screenshot",
       "PIL rendered settings UI screenshot", _settings_ui),
      ("pil_chat_dark", "ui_screenshot",
       "PIL rendered dark-mode chat screenshot", _dark_chat),
      ("pil_form", "text_document", "PIL rendered blank form", _form),
      ("pil_receipt", "text_document", "PIL rendered receipt (grey)",
       _receipt),
      ("pil_slide", "ui_screenshot", "PIL rendered presentation slide",
       _slide),
      ("pil_sign", "graphic", "PIL rendered yellow sign with big text",
       _sign),
  )
  items.extend(_item(name, kind, origin, draw(font))
               for name, kind, origin, draw in drawn)
  return items


# --- gathering and writing

# (pip name, import name, maker): sources outside the project's environment.
_EXTRA_SOURCES = (
    ("scikit-image", "skimage", skimage_images),
    ("scikit-learn", "sklearn", sklearn_images),
    ("pydicom", "pydicom", dicom_slices),
)
_OWN_SOURCES = (matplotlib_samples, matplotlib_charts, rendered_documents)


def gather(notes: List[str]) -> List[Item]:
  """Every image the installed packages can give, sorted by name.

  Args:
    notes: receives one line per source or file skipped.

  Returns:
    The items, names unique.
  """
  items = []
  for pip_name, module, make in _EXTRA_SOURCES:
    package = _package_dir(module)
    if package is None:
      notes.append(f"{pip_name}: not installed, its images skipped"
                   " (see --extra_packages)")
      continue
    items.extend(make(package, notes))
  for make in _OWN_SOURCES:
    items.extend(make(notes))
  names = [item.name for item in items]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ValueError(f"duplicate image names: {duplicates}")
  return sorted(items, key=lambda item: item.name)


def manifest_path(output: str) -> str:
  """PATH.zip → PATH.manifest.tsv."""
  return os.path.splitext(output)[0] + ".manifest.tsv"


def write_archive(items: Sequence[Item], output: str) -> str:
  """Writes the zip, then the manifest beside it; returns the manifest path.

  Members are PNGs under `other/`, stored (PNG is compressed already), in
  name order, with a fixed timestamp and mode. The zip is written to a
  temporary name and renamed, so a zip at `output` is always whole.
  """
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  partial = output + ".partial"
  rows = ["member\tkind\torigin"]
  with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED) as zf:
    for item in items:
      member = f"{FOLDER}/{item.name}.png"
      buf = io.BytesIO()
      item.image.save(buf, format="PNG")
      info = zipfile.ZipInfo(member, date_time=_ZIP_TIME)
      info.create_system = _UNIX
      info.external_attr = _MEMBER_MODE
      zf.writestr(info, buf.getvalue())
      rows.append(f"{member}\t{item.kind}\t{item.origin}")
  os.replace(partial, output)
  manifest = manifest_path(output)
  with open(manifest, "w", encoding="utf-8", newline="\n") as f:
    f.write("\n".join(rows) + "\n")
  return manifest


def run(output: str, extra_packages: Optional[str] = None) -> Dict:
  """Gathers the images, writes zip and manifest; returns counts and notes.

  Args:
    output: the zip to write (PATH.zip); PATH.manifest.tsv goes beside it.
    extra_packages: a `pip install --target` directory holding
      scikit-image, scikit-learn and pydicom; searched after sys.path.
  """
  if extra_packages and extra_packages not in sys.path:
    sys.path.append(extra_packages)  # last: the environment's numpy wins
    importlib.invalidate_caches()
  notes: List[str] = []
  items = gather(notes)
  manifest = write_archive(items, output)
  per_kind = collections.Counter(item.kind for item in items)
  return {"zip": output, "manifest": manifest, "images": len(items),
          "per_kind": dict(sorted(per_kind.items())), "skipped": notes}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m bench.non_us_archive",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--output", required=True,
                      help="Zip to write (PATH.zip); the manifest goes to"
                      " PATH.manifest.tsv.")
  parser.add_argument("--extra_packages", default=None,
                      help="Directory made by `pip install --target DIR"
                      " scikit-image pydicom scikit-learn`.")
  args = parser.parse_args(argv)
  if not args.output.endswith(".zip"):
    parser.error("--output must end in .zip")
  if args.extra_packages and not os.path.isdir(args.extra_packages):
    parser.error(f"--extra_packages {args.extra_packages}: not a directory")
  summary = run(args.output, args.extra_packages)
  for note in summary["skipped"]:
    print("skipped:", note)
  print(json.dumps({k: summary[k] for k in
                    ("zip", "manifest", "images", "per_kind")}, indent=2))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
