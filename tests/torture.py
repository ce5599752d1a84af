"""A torture set of broken and hostile archives, each member's fate known."""

import io
import struct
import tarfile
import zipfile
import zlib
from typing import List, NamedTuple

import cv2
import numpy as np
from PIL import Image

from tests import archive_factory as af
from tests.archive_factory import Entry


class Archive(NamedTuple):
  """An input file and the error rows it must produce at archive level."""
  name: str
  data: bytes
  # (source suffix, error_type) for errors that name the archive itself.
  archive_errors: tuple = ()


def _pil(img: np.ndarray, fmt: str, **kwargs) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, fmt, **kwargs)
  return buf.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
  """A tiny PNG whose header claims width × height pixels."""
  data = bytearray(af.png(np.zeros((1, 1), np.uint8)))
  data[16:24] = struct.pack(">II", width, height)
  crc = zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF
  data[29:33] = struct.pack(">I", crc)
  return bytes(data)


def _exif_rotated_jpeg(img: np.ndarray) -> bytes:
  exif = Image.Exif()
  exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
  return _pil(img, "JPEG", exif=exif.tobytes())


def image_entries(seed: int = 0) -> List[Entry]:
  """Every kind of image member from the hardening issue."""
  rng = np.random.default_rng(seed)
  grey = af.speckle(rng, 40, 30)
  rgb = af.speckle(rng, 30, 40, 3)
  png = af.png(grey)
  jpeg = af.jpeg(rgb)
  d = "scans/benign"
  return [
      Entry(f"{d}/truncated.png", png[:len(png) // 2], "error",
            error_type="CorruptImage"),
      Entry(f"{d}/truncated.jpg", jpeg[:len(jpeg) // 2], "error",
            error_type="CorruptImage"),
      Entry(f"{d}/zero.png", b"", "error", error_type="EmptyFile"),
      Entry(f"{d}/one_pixel.png", af.png(np.full((1, 1), 7, np.uint8)),
            "image", "benign"),
      Entry(f"{d}/wide.png", af.png(af.speckle(rng, 2, 3000)), "image",
            "benign"),
      Entry(f"{d}/tall.png", af.png(af.speckle(rng, 3000, 1)), "image",
            "benign"),
      Entry(f"{d}/sixteen_bit.png",
            af.png(af.speckle(rng, 20, 20, dtype=np.uint16)), "image",
            "benign"),
      Entry(f"{d}/palette.png", _pil_palette(grey), "image", "benign"),
      Entry(f"{d}/grey_alpha.png", _pil(np.dstack([grey, grey]), "PNG"),
            "image", "benign"),
      Entry(f"{d}/cmyk.jpg", _pil_cmyk(rgb), "image", "benign"),
      Entry(f"{d}/progressive.jpg", _pil(rgb, "JPEG", progressive=True),
            "image", "benign"),
      Entry(f"{d}/exif_rotated.jpg", _exif_rotated_jpeg(rgb), "image",
            "benign"),
      Entry(f"{d}/scan.bmp", cv2.imencode(".bmp", grey)[1].tobytes(), "image",
            "benign"),
      Entry(f"{d}/scan.tiff", cv2.imencode(".tiff", grey)[1].tobytes(),
            "image", "benign"),
      Entry(f"{d}/scan.webp", cv2.imencode(".webp", rgb)[1].tobytes(),
            "image", "benign"),
      Entry(f"{d}/jpeg_named.png", jpeg, "image", "benign"),
      Entry(f"{d}/text_named.png", b"patient list, not an image\n", "error",
            error_type="NotAnImage"),
      Entry(f"{d}/report_named.png", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj",
            "error", error_type="NotAnImage"),
      Entry(f"{d}/pixel_flood.png", _png_declaring(40000, 40000), "error",
            error_type="TooManyPixels"),
      Entry(f"{d}/nested.zip", _zip_bytes([Entry("x.png", png, "image")]),
            "error", error_type="NestedArchive"),
      Entry(f"{d}/nested.tar.gz", _targz_bytes([Entry("x.png", png,
                                                        "image")]),
            "error", error_type="NestedArchive"),
      Entry("../../etc/escape.png", af.png(af.speckle(rng, 9, 9)), "image",
            ""),
      Entry("/absolute/benign/abs.png", af.png(af.speckle(rng, 9, 9)),
            "image", "benign"),
      Entry("malignant/ünïcødé scan (1).png", af.png(af.speckle(rng, 9, 9)),
            "image", "malignant"),
      # The same bytes twice: one row each, same image_id (no dedup).
      Entry("normal/dup (1).png", png, "image", "normal"),
      Entry("benign/dup copy.png", png, "image", "benign"),
      Entry("normal/dup (1)_mask.png", png, "mask"),
  ]


def _pil_palette(grey: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(grey).convert("P").save(buf, "PNG")
  return buf.getvalue()


def _pil_cmyk(rgb: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(rgb).convert("CMYK").save(buf, "JPEG")
  return buf.getvalue()


def _zip_bytes(entries: List[Entry]) -> bytes:
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
    for e in entries:
      zf.writestr(e.path, e.data)
  return buf.getvalue()


def _targz_bytes(entries: List[Entry]) -> bytes:
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w:gz") as tf:
    for e in entries:
      info = tarfile.TarInfo(e.path)
      info.size = len(e.data)
      tf.addfile(info, io.BytesIO(e.data))
  return buf.getvalue()


def hostile_zip(bomb_mb: int = 80) -> bytes:
  """Zip-level hostiles beside the image torture set: a bomb, an encrypted
  member."""
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
    for e in image_entries():
      zf.writestr(e.path, e.data)
    with zf.open("scans/bomb.png", "w", force_zip64=True) as member:
      block = b"\0" * (1 << 20)
      for _ in range(bomb_mb):
        member.write(block)
    zf.writestr("scans/secret.png", af.png(np.zeros((4, 4), np.uint8)))
  return _mark_encrypted(buf.getvalue(), "scans/secret.png")


def _mark_encrypted(data: bytes, name: str) -> bytes:
  """Sets the 'encrypted' flag of one member in its local and central headers
  (zipfile cannot write encrypted members)."""
  out = bytearray(data)
  with zipfile.ZipFile(io.BytesIO(data)) as zf:
    info = zf.getinfo(name)
  local = info.header_offset
  assert out[local:local + 4] == b"PK\x03\x04"
  out[local + 6] |= 0x1
  central = out.find(b"PK\x01\x02", 0)
  while central != -1:
    name_len = struct.unpack("<H", out[central + 28:central + 30])[0]
    if out[central + 46:central + 46 + name_len] == name.encode():
      out[central + 8] |= 0x1
    central = out.find(b"PK\x01\x02", central + 4)
  return bytes(out)


HOSTILE_ZIP_ERRORS = {"scans/bomb.png": "CompressionRatioExceeded",
                      "scans/secret.png": "EncryptedMember"}


def links_tar() -> bytes:
  """A tar with a symlink, a hard link, a device and one real image."""
  buf = io.BytesIO()
  png = af.png(np.full((5, 5), 100, np.uint8))
  with tarfile.open(fileobj=buf, mode="w") as tf:
    info = tarfile.TarInfo("normal/real.png")
    info.size = len(png)
    tf.addfile(info, io.BytesIO(png))
    for name, kind in (("normal/link.png", tarfile.SYMTYPE),
                       ("normal/hard.png", tarfile.LNKTYPE),
                       ("normal/dev.png", tarfile.CHRTYPE)):
      info = tarfile.TarInfo(name)
      info.type = kind
      info.linkname = "/etc/passwd"
      tf.addfile(info)
  return buf.getvalue()


def broken_archives() -> List[Archive]:
  """Whole archives that are broken, empty, or not archives at all."""
  good = _zip_bytes([Entry(f"benign/b{i}.png", af.png(
      np.full((6, 6), i, np.uint8)), "image") for i in range(4)])
  targz = _targz_bytes([Entry(f"benign/t{i}.png", af.png(
      af.speckle(np.random.default_rng(i), 64, 64)), "image")
                        for i in range(6)])
  return [
      Archive("cut_short.zip", good[:len(good) // 2],
              (("cut_short.zip", "BadArchive"),)),
      Archive("empty.zip", _zip_bytes([]), (("empty.zip", "EmptyArchive"),)),
      Archive("empty.tar", _tar_empty(), (("empty.tar", "EmptyArchive"),)),
      Archive("zero_bytes.zip", b"", (("zero_bytes.zip", "BadArchive"),)),
      Archive("not_really.tar.gz", b"just some text",
              (("not_really.tar.gz", "BadArchive"),)),
      Archive("truncated.tar.gz", targz[:len(targz) * 2 // 3],
              (("truncated.tar.gz", "BadArchive"),)),
  ]


def _tar_empty() -> bytes:
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w"):
    pass
  return buf.getvalue()
