"""Unit tests of the DICOM reader (busi_core.dicom): real pydicom, no runner.

Files are made in memory by bench.dicom_writer, or taken from the test
corpus that ships inside the installed pydicom package (never downloaded).
"""

import glob
import gzip
import io
import json
import logging
import os
import warnings
import zipfile

import cv2
import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import uid
from pydicom.pixels.decoders.base import Decoder

from bench import dicom_archive
from bench import dicom_writer as dw
from busi_core import dicom
from busi_core.errors import MemberError

CORPUS = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files")
KINDS = {"NoPixelData", "CorruptImage", "UnsupportedTransferSyntax",
         "TooManyPixels", "UnsupportedPixelType"}
BIG = 10 ** 9


def corpus(name: str) -> bytes:
  path = pydicom.data.get_testdata_file(name, download=False)
  assert path and path.startswith(CORPUS), name
  with open(path, "rb") as f:
    return f.read()


def decode(data: bytes, max_frames=None):
  header = dicom.read_header(data, BIG)
  return header, list(dicom.iter_frames(data, header, max_frames))


def only_frame(data: bytes) -> np.ndarray:
  _, frames = decode(data)
  assert len(frames) == 1 and frames[0].number is None
  return frames[0].pixels


def smooth_rgb(rows=32, columns=48, seed=0) -> np.ndarray:
  """Colour whose horizontal pixel pairs are equal: 4:2:2 loses nothing."""
  rng = np.random.default_rng(seed)
  half = rng.integers(30, 226, (rows, columns // 2, 3), dtype=np.uint8)
  return np.repeat(half, 2, axis=1)


def grey(rows=24, columns=40, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (rows, columns),
                                              dtype=np.uint8)


def png(img: np.ndarray) -> bytes:
  ok, buf = cv2.imencode(".png", img)
  assert ok
  return buf.tobytes()


# --- is_dicom ---------------------------------------------------------------

@pytest.mark.parametrize("syntax", [uid.ExplicitVRLittleEndian,
                                    uid.ImplicitVRLittleEndian,
                                    uid.ExplicitVRBigEndian])
def test_is_dicom_with_and_without_preamble(syntax):
  for preamble in (True, False):
    data = dw.ultrasound_dicom(grey(), transfer_syntax=syntax,
                               preamble=preamble)
    assert (data[128:132] == b"DICM") is preamble
    assert dicom.is_dicom(data)
    np.testing.assert_array_equal(only_frame(data), grey())


@pytest.mark.parametrize("name", ["ExplVR_LitEndNoMeta.dcm",
                                  "ExplVR_BigEndNoMeta.dcm",
                                  "MR_small.dcm", "rtplan.dcm"])
def test_is_dicom_on_corpus_files(name):
  assert dicom.is_dicom(corpus(name))


def test_no_meta_corpus_file_starts_with_a_stray_byte():
  # pydicom's no_meta.dcm is CT_small.dcm's dataset behind one stray 0x20:
  # no reader finds an element at offset 0 (pydicom reads one garbage
  # element), so it is not claimed; without the byte it is a bare dataset.
  data = corpus("no_meta.dcm")
  assert data[:1] == b" " and not dicom.is_dicom(data)
  with pytest.raises(MemberError) as e:
    dicom.read_header(data, BIG)
  assert e.value.kind == "CorruptImage"
  assert dicom.is_dicom(data[1:])
  pixels = only_frame(data[1:])
  assert pixels.shape == (128, 128) and pixels.dtype == np.uint8


def _zip() -> bytes:
  out = io.BytesIO()
  with zipfile.ZipFile(out, "w") as z:
    z.writestr("benign/a.dcm", dw.ultrasound_dicom(grey()))
  return out.getvalue()


@pytest.mark.parametrize("data", [
    png(grey()),
    cv2.imencode(".jpg", grey())[1].tobytes(),
    cv2.imencode(".bmp", grey())[1].tobytes(),
    _zip(),
    gzip.compress(b"x" * 300),
    b"Hello, this is a plain text file.\n" * 10,
    b'{"PatientName": "x", "Rows": 512}',
    b"<html><body>Please log in</body></html>",
    b"\x00" * 300,
    b"",
    b"\x08\x00",
    b"\x08\x00\x05\x00CS",
], ids=["png", "jpeg", "bmp", "zip", "gzip", "text", "json", "html",
        "zeros", "empty", "two_bytes", "cut_element"])
def test_is_dicom_refuses_other_formats(data):
  assert not dicom.is_dicom(data)


def test_is_dicom_refuses_random_bytes():
  rng = np.random.default_rng(7)
  claimed = sum(dicom.is_dicom(rng.bytes(int(n)))
                for n in rng.integers(0, 400, 2000))
  assert claimed == 0


# --- photometrics -----------------------------------------------------------

def test_monochrome2_8bit_is_bit_identical():
  pixels = grey()
  out = only_frame(dw.ultrasound_dicom(pixels))
  assert out.dtype == np.uint8 and out.ndim == 2
  np.testing.assert_array_equal(out, pixels)


def test_monochrome1_is_inverted():
  pixels = grey()
  out = only_frame(dw.ultrasound_dicom(pixels, photometric="MONOCHROME1"))
  np.testing.assert_array_equal(out, 255 - pixels)


@pytest.mark.parametrize("planar", [0, 1])
def test_rgb_exact_in_both_planar_configurations(planar):
  pixels = smooth_rgb(seed=planar)
  pixels[0, 0] = (255, 0, 7)  # channel order must survive
  data = dw.ultrasound_dicom(pixels, photometric="RGB", planar=planar)
  assert pydicom.dcmread(io.BytesIO(data)).PlanarConfiguration == planar
  np.testing.assert_array_equal(only_frame(data), pixels)


@pytest.mark.parametrize("photometric", ["YBR_FULL", "YBR_FULL_422"])
def test_ybr_comes_out_rgb(photometric):
  pixels = smooth_rgb()
  out = only_frame(dw.ultrasound_dicom(pixels, photometric=photometric))
  assert out.shape == pixels.shape
  assert np.abs(out.astype(int) - pixels).max() <= 2


def test_ybr_full_planar_1():
  pixels = smooth_rgb(seed=3)
  out = only_frame(dw.ultrasound_dicom(pixels, photometric="YBR_FULL",
                                       planar=1))
  assert np.abs(out.astype(int) - pixels).max() <= 2


@pytest.mark.parametrize("bits", [8, 16])
def test_palette_colour_exact(bits):
  rng = np.random.default_rng(bits)
  lut = rng.integers(0, 256, (256, 3), dtype=np.uint8)
  lut[255] = (255, 255, 255)
  indices = grey(seed=bits)
  indices[0, 0] = 255
  out = only_frame(dw.ultrasound_dicom(indices, photometric="PALETTE COLOR",
                                       palette=lut, palette_bits=bits))
  np.testing.assert_array_equal(out, lut[indices])


@pytest.mark.parametrize("syntax", [uid.RLELossless, uid.JPEG2000Lossless,
                                    uid.JPEGLSLossless,
                                    uid.ImplicitVRLittleEndian,
                                    uid.ExplicitVRBigEndian])
def test_lossless_syntaxes_exact(syntax):
  # 64 × 64: OpenJPEG's default resolution levels need that much.
  for photometric, pixels in (("MONOCHROME2", grey(64, 64)),
                              ("RGB", smooth_rgb(64, 64))):
    data = dw.ultrasound_dicom(pixels, photometric=photometric,
                               transfer_syntax=syntax)
    header = dicom.read_header(data, BIG)
    assert header.transfer_syntax == syntax.name
    np.testing.assert_array_equal(only_frame(data), pixels)


def test_jpeg_baseline_close():
  for photometric, pixels in (("MONOCHROME2", np.kron(grey(6, 8), np.ones(
      (8, 8), np.uint8))), ("YBR_FULL_422", np.kron(smooth_rgb(6, 8), np.ones(
          (8, 8, 1), np.uint8)))):
    data = dw.ultrasound_dicom(pixels, photometric=photometric,
                               transfer_syntax=uid.JPEGBaseline8Bit)
    out = only_frame(data)
    assert out.shape == pixels.shape
    assert np.abs(out.astype(int) - pixels).mean() < 3


@pytest.mark.parametrize("name", ["SC_ybr_full_422_uncompressed.dcm",
                                  "examples_ybr_color.dcm",
                                  "SC_jpeg_no_color_transform.dcm",
                                  "SC_jpeg_no_color_transform_2.dcm",
                                  "SC_rgb_dcmtk_+eb+cy+s2.dcm",
                                  "examples_jpeg2k.dcm"])
def test_corpus_colour_matches_pydicom_rgb(name):
  data = corpus(name)
  header = dicom.read_header(data, BIG)
  first = next(dicom.iter_frames(data, header))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    expected = pydicom.pixels.pixel_array(io.BytesIO(data), index=0)
  if header.region:
    top, bottom, left, right = header.region
    expected = expected[top:bottom, left:right]
  assert first.pixels.shape[-1] == 3
  np.testing.assert_array_equal(first.pixels, expected)


@pytest.mark.parametrize("name,reference", [
    ("SC_ybr_full_422_uncompressed.dcm", "SC_rgb_rle.dcm"),
    ("SC_rgb_dcmtk_+eb+cy+s2.dcm", "SC_rgb_rle.dcm"),
    ("SC_jpeg_no_color_transform.dcm", "SC_rgb_jpeg.dcm"),
    ("SC_jpeg_no_color_transform_2.dcm", "SC_rgb_jpeg_app14_dcmd.dcm"),
])
def test_corpus_colour_agrees_with_its_rgb_twin(name, reference):
  out = only_frame(corpus(name)).astype(int)
  twin = only_frame(corpus(reference)).astype(int)
  assert np.abs(out - twin).mean() < 1 and np.abs(out - twin).max() <= 8


# --- bit depth, rescale, window ---------------------------------------------

def expected_scale(values, low, high):
  return np.clip(np.rint((values.astype(np.float64) - low) * 255 /
                         (high - low)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("bits,signed", [(12, False), (16, False), (12, True),
                                         (16, True), (10, False)])
def test_bits_stored_full_range(bits, signed):
  low = -(2 ** (bits - 1)) if signed else 0
  high = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
  values = np.linspace(low, high, 24 * 40).round().astype(np.int64)
  values = values.reshape(24, 40)
  values[0, :3] = (low, high, (low + high) // 2)
  out = only_frame(dw.ultrasound_dicom(values, bits_stored=bits,
                                       signed=signed))
  assert out[0, 0] == 0 and out[0, 1] == 255
  np.testing.assert_array_equal(out, expected_scale(values, low, high))


def test_16bit_value_times_257_round_trips():
  values = grey().astype(np.uint16) * 257
  out = only_frame(dw.ultrasound_dicom(values, bits_stored=16))
  np.testing.assert_array_equal(out, grey())


def test_no_per_image_stretch():
  values = np.full((8, 8), 1000, np.uint16)
  values[0, 0] = 1100
  out = only_frame(dw.ultrasound_dicom(values, bits_stored=12))
  assert out.max() == round(1100 * 255 / 4095) and out.min() == round(
      1000 * 255 / 4095)


def test_rescale_maps_the_rescaled_range():
  values = np.arange(0, 4096, 4, dtype=np.uint16).reshape(32, 32)
  plain = only_frame(dw.ultrasound_dicom(values, bits_stored=12))
  rescaled = only_frame(dw.ultrasound_dicom(values, bits_stored=12,
                                            rescale=(2.0, -1024.0)))
  # A positive linear rescale keeps the full range in the same place.
  np.testing.assert_array_equal(rescaled, plain)
  flipped = only_frame(dw.ultrasound_dicom(values, bits_stored=12,
                                           rescale=(-1.0, 100.0)))
  np.testing.assert_array_equal(flipped, 255 - plain)


def test_window_is_applied_and_mapped():
  values = np.arange(0, 4096, 4, dtype=np.uint16).reshape(32, 32)
  out = only_frame(dw.ultrasound_dicom(values, bits_stored=12,
                                       window=(2048, 1024)))
  assert (out[values < 1536] == 0).all()
  assert (out[values > 2560] == 255).all()
  assert abs(int(out[values == 2048][0]) - 128) <= 1
  assert (np.diff(out.ravel().astype(int)) >= 0).all()
  inverted = only_frame(dw.ultrasound_dicom(
      values, bits_stored=12, window=(2048, 1024), photometric="MONOCHROME1"))
  np.testing.assert_array_equal(inverted, 255 - out)


def test_window_in_rescaled_units():
  values = np.arange(0, 4096, 4, dtype=np.uint16).reshape(32, 32)
  # Rescaled = stored - 1024, so this is the window above on stored values.
  out = only_frame(dw.ultrasound_dicom(values, bits_stored=12,
                                       rescale=(1.0, -1024.0),
                                       window=(1024, 1024)))
  assert (out[values < 1536] == 0).all() and (out[values > 2560] == 255).all()


def test_zero_window_is_ignored():
  values = grey()
  out = only_frame(dw.ultrasound_dicom(values, window=(128, 0)))
  np.testing.assert_array_equal(out, values)


def test_enhanced_functional_groups_give_each_frame_its_transform():
  values = np.arange(0, 4096, 4, dtype=np.uint16).reshape(32, 32)
  data = dw.ultrasound_dicom(np.stack([values, values]), frames=2,
                             bits_stored=12)
  ds = pydicom.dcmread(io.BytesIO(data))
  frames = []
  for slope, intercept in ((1, 0), (-1, 0)):
    transform = pydicom.Dataset()
    transform.RescaleSlope, transform.RescaleIntercept = slope, intercept
    transform.RescaleType = "US"
    group = pydicom.Dataset()
    group.PixelValueTransformationSequence = [transform]
    frames.append(group)
  ds.PerFrameFunctionalGroupsSequence = frames
  out = io.BytesIO()
  ds.save_as(out)
  _, (first, second) = decode(out.getvalue())
  plain = only_frame(dw.ultrasound_dicom(values, bits_stored=12))
  np.testing.assert_array_equal(first.pixels, plain)
  np.testing.assert_array_equal(second.pixels, 255 - plain)
  # A shared window applies to both frames, per frame in rescaled units.
  window = pydicom.Dataset()
  window.WindowCenter, window.WindowWidth = 2048, 1024
  shared = pydicom.Dataset()
  shared.FrameVOILUTSequence = [window]
  ds.SharedFunctionalGroupsSequence = [shared]
  out = io.BytesIO()
  ds.save_as(out)
  _, (first, second) = decode(out.getvalue())
  assert (first.pixels[values < 1536] == 0).all()
  assert (first.pixels[values > 2560] == 255).all()
  assert (second.pixels == 0).all()  # rescaled values are all below it
  assert ds.get("RescaleSlope") is None  # the dataset was not changed


# --- regions ----------------------------------------------------------------

def test_region_crop_is_exact():
  pixels = grey(60, 80)
  data = dw.ultrasound_dicom(pixels, regions=[(10, 5, 49, 44, 1, 1)])
  header = dicom.read_header(data, BIG)
  assert header.region == (5, 45, 10, 50)
  frame = next(dicom.iter_frames(data, header))
  assert frame.region_cropped
  np.testing.assert_array_equal(frame.pixels, pixels[5:45, 10:50])


def test_largest_tissue_region_wins_over_larger_other_data():
  pixels = grey(60, 80)
  regions = [(0, 0, 79, 59, 1, 2),   # colour flow: biggest, not tissue
             (2, 2, 11, 11, 1, 1),   # small tissue
             (20, 10, 69, 49, 1, 1),  # largest tissue
             (0, 0, 79, 59, 3, 1)]   # spectral: not 2D
  header = dicom.read_header(dw.ultrasound_dicom(pixels, regions=regions),
                             BIG)
  assert header.region == (10, 50, 20, 70)


def test_largest_2d_region_without_tissue_type():
  regions = [(0, 0, 9, 9, 1, 2), (0, 0, 29, 19, 1, 3), (0, 0, 79, 59, 2, 1)]
  header = dicom.read_header(dw.ultrasound_dicom(grey(60, 80),
                                                 regions=regions), BIG)
  assert header.region == (0, 20, 0, 30)


@pytest.mark.parametrize("regions,expected", [
    (None, None),
    ([(0, 0, 79, 59, 2, 1)], None),  # M-mode only
    ([(50, 10, 20, 40, 1, 1)], None),  # x1 < x0
    ([(100, 100, 120, 120, 1, 1)], None),  # outside the image
    ([(70, 50, 200, 300, 1, 1)], (50, 60, 70, 80)),  # clipped
])
def test_region_absent_or_invalid(regions, expected):
  pixels = grey(60, 80)
  data = dw.ultrasound_dicom(pixels, regions=regions)
  header = dicom.read_header(data, BIG)
  assert header.region == expected
  frame = next(dicom.iter_frames(data, header))
  assert frame.region_cropped is (expected is not None)
  if expected is None:
    np.testing.assert_array_equal(frame.pixels, pixels)


# --- multi-frame ------------------------------------------------------------

def cine(count=5, rows=20, columns=30):
  return np.stack([np.full((rows, columns), 40 * k, np.uint8)
                   for k in range(count)])


@pytest.mark.parametrize("syntax", [uid.ExplicitVRLittleEndian,
                                    uid.RLELossless, uid.JPEGLSLossless,
                                    uid.JPEGBaseline8Bit])
def test_multi_frame_numbered_and_limited(syntax):
  stack = cine()
  data = dw.ultrasound_dicom(stack, frames=5, transfer_syntax=syntax,
                             regions=[(5, 2, 24, 17, 1, 1)])
  header, frames = decode(data)
  assert header.frames == 5 and header.multi_frame
  assert [f.number for f in frames] == [1, 2, 3, 4, 5]
  for k, frame in enumerate(frames):
    assert frame.pixels.shape == (16, 20)
    assert np.abs(frame.pixels.astype(int) - 40 * k).max() <= 2
  _, two = decode(data, max_frames=2)
  assert [f.number for f in two] == [1, 2]
  _, none = decode(data, max_frames=0)
  assert none == []


def test_frames_are_decoded_one_at_a_time(monkeypatch):
  calls = []
  original = Decoder.as_array

  def spy(self, src, **kwargs):
    calls.append((kwargs.get("index"), kwargs.get("number_of_frames")))
    return original(self, src, **kwargs)

  monkeypatch.setattr(Decoder, "as_array", spy)
  for syntax in (uid.ExplicitVRLittleEndian, uid.RLELossless):
    calls.clear()
    data = dw.ultrasound_dicom(cine(6), frames=6, transfer_syntax=syntax)
    header = dicom.read_header(data, BIG)
    frames = dicom.iter_frames(data, header)
    assert calls == []  # nothing decoded before asked
    next(frames)
    assert len(calls) == 1
    rest = list(frames)
    assert len(rest) == 5 and len(calls) == 6
    # Each call yields one frame: an index, or a one-frame buffer.
    assert all(index is not None for index, _ in calls)


def test_bad_frame_does_not_end_the_cine():
  data = bytearray(dw.ultrasound_dicom(
      cine(4, 16, 16), frames=4, transfer_syntax=uid.JPEGBaseline8Bit))
  # Break frame 2's codestream past its header (its scan data).
  starts = [i for i in range(len(data)) if data[i:i + 3] == b"\xff\xd8\xff"]
  assert len(starts) == 4
  data[starts[1] + 2:starts[1] + 40] = b"\x00" * 38
  data = bytes(data)
  header = dicom.read_header(data, BIG)
  frames = dicom.iter_frames(data, header)
  outcomes = []
  while True:
    try:
      outcomes.append(next(frames).number)
    except StopIteration:
      break
    except MemberError as e:
      assert e.kind == "CorruptImage" and "frame 2 of 4" in str(e)
      outcomes.append("error")
  assert outcomes == [1, "error", 3, 4]


def test_truncated_native_cine_keeps_its_complete_frames():
  data = dw.ultrasound_dicom(cine(4), frames=4)
  cut = data[:len(data) - 20 * 30 - 100]  # frame 4 and part of frame 3
  header = dicom.read_header(cut, BIG)
  frames = dicom.iter_frames(cut, header)
  assert next(frames).number == 1 and next(frames).number == 2
  for _ in range(2):
    with pytest.raises(MemberError) as e:
      next(frames)
    assert e.value.kind == "CorruptImage"
  with pytest.raises(StopIteration):
    next(frames)


# --- wrapped PNGs -----------------------------------------------------------

@pytest.mark.parametrize("kind", ["grey", "rgb", "rgba", "grey16"])
def test_wrapped_png_decodes_to_the_png_pixels(kind):
  rng = np.random.default_rng(3)
  if kind == "grey":
    image = rng.integers(0, 256, (33, 47), dtype=np.uint8)
  elif kind == "grey16":
    image = (rng.integers(0, 256, (33, 47)) * 257).astype(np.uint16)
  else:
    image = rng.integers(0, 256, (33, 47, 3 if kind == "rgb" else 4),
                         dtype=np.uint8)
  out = only_frame(dw.wrap_png(png(image)))
  if kind == "grey":
    expected = image
  elif kind == "grey16":
    expected = (image // 257).astype(np.uint8)
  else:
    expected = cv2.cvtColor(image[..., :3], cv2.COLOR_BGR2RGB)
  np.testing.assert_array_equal(out, expected)


def test_wrapped_png_with_region():
  image = grey(40, 60)
  data = dw.wrap_png(png(image), regions=[(10, 0, 59, 39, 1, 1)])
  np.testing.assert_array_equal(only_frame(data), image[:, 10:])


# --- header facts and errors ------------------------------------------------

def test_header_facts():
  data = dw.ultrasound_dicom(grey(), burned_in=" yes ", study_uid="1.2.3",
                             series_uid="1.2.3.4")
  header = dicom.read_header(data, BIG)
  assert header == dicom.DicomHeader(
      transfer_syntax="Explicit VR Little Endian", frames=1,
      multi_frame=False, study_uid="1.2.3", series_uid="1.2.3.4",
      burned_in_annotation=True, region=None)
  for value, expected in (("NO", False), (None, False), ("YES", True)):
    header = dicom.read_header(dw.ultrasound_dicom(grey(), burned_in=value),
                               BIG)
    assert header.burned_in_annotation is expected


def error_of(data, max_pixels=BIG) -> MemberError:
  with pytest.raises(MemberError) as e:
    header = dicom.read_header(data, max_pixels)
    list(dicom.iter_frames(data, header))
  return e.value


def test_no_pixel_data():
  e = error_of(dw.no_pixel_dicom())
  assert e.kind == "NoPixelData" and "Basic Text SR" in str(e)
  for name in ("rtplan.dcm", "rtstruct.dcm", "waveform_ecg.dcm",
               "test-SR.dcm"):
    assert error_of(corpus(name)).kind == "NoPixelData"


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.99])
def test_truncated_file_is_corrupt(keep):
  data = dw.ultrasound_dicom(grey(60, 80))
  assert error_of(data[:int(len(data) * keep)]).kind == "CorruptImage"


def test_truncated_compressed_file_is_corrupt():
  data = dw.ultrasound_dicom(grey(60, 80), transfer_syntax=uid.RLELossless)
  assert error_of(data[:len(data) - 200]).kind == "CorruptImage"


def test_unsupported_video_syntax_names_it_and_the_way_out():
  e = error_of(dw.video_dicom())
  assert e.kind == "UnsupportedTransferSyntax"
  assert "MPEG-4" in str(e) and uid.MPEG4HP41 in str(e)
  assert "export the frames" in str(e)


@pytest.mark.parametrize("name", ["JPGExtended.dcm", "JPEG-lossy.dcm"])
def test_12bit_jpeg_names_the_gpl_plugin(name):
  e = error_of(corpus(name))
  assert e.kind == "UnsupportedTransferSyntax"
  assert "pylibjpeg-libjpeg (GPL-3.0, not installed by design)" in str(e)


def test_unavailable_plugin_is_named(monkeypatch):
  monkeypatch.setattr(Decoder, "is_available", property(lambda self: False))
  e = error_of(dw.ultrasound_dicom(grey(), transfer_syntax=uid.JPEGLSLossless))
  assert e.kind == "UnsupportedTransferSyntax"
  assert "pyjpegls" in str(e) and uid.JPEGLSLossless in str(e)


def test_too_many_pixels_before_decoding(monkeypatch):
  monkeypatch.setattr(Decoder, "as_array", None)  # must not be reached
  e = error_of(dw.ultrasound_dicom(grey(60, 80)), max_pixels=60 * 80 - 1)
  assert e.kind == "TooManyPixels" and "60x80" in str(e)
  dicom.read_header(dw.ultrasound_dicom(grey(60, 80)), 60 * 80)


def test_float_pixel_data_is_unsupported():
  ds = pydicom.dcmread(io.BytesIO(dw.ultrasound_dicom(grey())))
  del ds.PixelData
  ds.FloatPixelData = np.zeros(24 * 40, "<f4").tobytes()
  out = io.BytesIO()
  ds.save_as(out)
  assert error_of(out.getvalue()).kind == "UnsupportedPixelType"


def test_codestream_larger_than_header_is_refused_before_decoding():
  data = bytearray(dw.ultrasound_dicom(grey(16, 16),
                                       transfer_syntax=uid.JPEGBaseline8Bit))
  sof = data.find(b"\xff\xc0")
  data[sof + 5:sof + 9] = b"\xea\x60\xea\x60"  # 60000 x 60000
  e = error_of(bytes(data))
  assert e.kind == "CorruptImage" and "60000x60000" in str(e)


def test_gdcm_abort_costs_one_frame_not_the_process():
  # GDCM, the one plugin here for JPEG Lossless, abort()s on this frame
  # (a changed Adobe APP14 byte); it runs in a child process, so the
  # frame is CorruptImage and the next file decodes in a new child.
  original = corpus("SC_rgb_jpeg_gdcm.dcm")
  ds = pydicom.dcmread(io.BytesIO(original))
  assert ds.file_meta.TransferSyntaxUID == uid.JPEGLosslessSV1
  frame = bytearray(next(pydicom.encaps.generate_frames(
      ds.PixelData, number_of_frames=1)))
  frame[17] = 0x3F
  ds.PixelData = pydicom.encaps.encapsulate([bytes(frame)])
  out = io.BytesIO()
  ds.save_as(out)
  e = error_of(out.getvalue())
  assert e.kind == "CorruptImage" and "DecoderProcessDied" in str(e)
  np.testing.assert_array_equal(only_frame(original),
                                only_frame(corpus("SC_rgb_rle.dcm")))


def test_deflate_bomb_is_refused(monkeypatch):
  data = corpus("image_dfl.dcm")
  assert only_frame(data).shape == (512, 512)
  monkeypatch.setattr(dicom, "_MAX_INFLATED", 100_000)
  e = error_of(data)
  assert e.kind == "CorruptImage" and "inflates" in str(e)


# --- the whole pydicom corpus -----------------------------------------------

def corpus_files():
  files = []
  for path in sorted(glob.glob(os.path.join(CORPUS, "**", "*"),
                               recursive=True)):
    name = os.path.relpath(path, CORPUS)
    if os.path.isfile(path) and (name.endswith(".dcm") or
                                 name.startswith("dicomdirtests")):
      files.append(name)
  return files


# Every corpus file that does not decode, and why.
CORPUS_ERRORS = {
    "JPEG-lossy.dcm": "UnsupportedTransferSyntax",  # 12-bit JPEG
    "JPGExtended.dcm": "UnsupportedTransferSyntax",
    "JPEG2000-embedded-sequence-delimiter.dcm": "CorruptImage",
    "MR_truncated.dcm": "CorruptImage",
    "badVR.dcm": "CorruptImage",
    "meta_missing_tsyntax.dcm": "CorruptImage",
    "nested_priv_SQ.dcm": "CorruptImage",
    "no_meta.dcm": "CorruptImage",  # a stray first byte
    # Image objects without pixel data (header-only test files).
    "UN_sequence.dcm": "CorruptImage",
    "priv_SQ.dcm": "CorruptImage",
    "no_meta_group_length.dcm": "CorruptImage",
    "dicomdirtests/README.txt": "CorruptImage",  # not DICOM
    "dicomdirtests/TINY_ALPHA/README": "CorruptImage",
}


def test_corpus_is_the_installed_one():
  files = corpus_files()
  assert sum(f.endswith(".dcm") for f in files) >= 70
  assert set(CORPUS_ERRORS) <= set(files)


@pytest.mark.parametrize("name", corpus_files())
def test_every_corpus_file_decodes_or_names_its_kind(name):
  with open(os.path.join(CORPUS, name), "rb") as f:
    data = f.read()
  outcome = None
  try:
    header = dicom.read_header(data, BIG)
    frames = dicom.iter_frames(data, header)
    count = 0
    while True:
      try:
        frame = next(frames)
      except StopIteration:
        break
      except MemberError as e:
        assert e.kind in KINDS
        outcome = e.kind
        continue
      count += 1
      assert frame.pixels.dtype == np.uint8
      assert frame.pixels.ndim == 2 or (frame.pixels.ndim == 3 and
                                        frame.pixels.shape[2] == 3)
      assert frame.number == (count if header.multi_frame else None)
    if outcome is None:
      assert count == header.frames
  except MemberError as e:
    assert e.kind in KINDS, e.kind
    outcome = e.kind
  expected = CORPUS_ERRORS.get(name)
  if expected is None and _has_pixels(data):
    assert outcome is None
  elif expected is None and "TINY_ALPHA/PT" in name:
    # CT image headers whose pixels were stripped.
    assert outcome == "CorruptImage"
  elif expected is None:
    assert outcome == "NoPixelData"
  else:
    assert outcome == expected


def _has_pixels(data: bytes) -> bool:
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
      ds = pydicom.dcmread(io.BytesIO(data), force=True,
                           stop_before_pixels=False, defer_size=64)
    except Exception:  # pylint: disable=broad-except
      return False
    return "PixelData" in ds


# --- PHI never leaves -------------------------------------------------------

PHI_VALUES = list(dw.PHI.values()) + list(dw.NESTED_PHI.values()) + [
    "ZZPHI findings for Alice", "Alice", "Quetzal", "Xyloville"]


def phi_files():
  rgb = smooth_rgb()
  good = dw.ultrasound_dicom(rgb, photometric="RGB")
  jpeg = bytearray(dw.ultrasound_dicom(cine(3, 16, 16), frames=3,
                                       transfer_syntax=uid.JPEGBaseline8Bit))
  first = jpeg.find(b"\xff\xd8\xff")
  jpeg[first + 2:first + 40] = b"\0" * 38
  float_ds = pydicom.dcmread(io.BytesIO(dw.ultrasound_dicom(grey())))
  del float_ds.PixelData
  float_ds.FloatPixelData = b"\0" * 16
  floats = io.BytesIO()
  float_ds.save_as(floats)
  return {
      "good": good,
      "no_pixels": dw.no_pixel_dicom(),
      "truncated": good[:len(good) // 2],
      "truncated_header": good[:900],
      "video": dw.video_dicom(),
      "too_many": good,
      "bad_frame": bytes(jpeg),
      "float": floats.getvalue(),
      "odd_photometric": dw.ultrasound_dicom(grey()).replace(
          b"MONOCHROME2", b"HSV        "),
      "phi_photometric": dw.ultrasound_dicom(grey()).replace(
          b"MONOCHROME2", dw.PHI["PatientID"].encode() + b" "),
  }


@pytest.mark.parametrize("case", list(phi_files()))
def test_no_phi_in_messages_logs_or_warnings(case, caplog):
  data = phi_files()[case]
  assert any(v.encode() in data for v in dw.PHI.values())
  messages = []
  caplog.set_level(logging.DEBUG)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
      header = dicom.read_header(data, 10 if case == "too_many" else BIG)
      frames = dicom.iter_frames(data, header)
      while True:
        try:
          next(frames)
        except StopIteration:
          break
        except MemberError as e:
          messages.append(str(e))
    except MemberError as e:
      messages.append(str(e))
  if case != "good":
    assert messages, case
  text = "\n".join(messages + [r.getMessage() for r in caplog.records] +
                   [str(w.message) for w in caught])
  for value in PHI_VALUES:
    assert value not in text, (case, value)


def test_header_holds_no_phi():
  header = dicom.read_header(dw.ultrasound_dicom(grey()), BIG)
  assert not any(v in repr(header) for v in PHI_VALUES)


def test_pydicom_logger_is_silenced():
  logger = logging.getLogger("pydicom")
  assert logger.level == logging.CRITICAL and not logger.propagate
  assert (pydicom.config.settings.reading_validation_mode ==
          pydicom.config.IGNORE)


# --- fuzz -------------------------------------------------------------------

_SEEDS = [dw.ultrasound_dicom(grey(8, 10), regions=[(1, 1, 8, 6, 1, 1)]),
          dw.ultrasound_dicom(cine(2, 8, 8), frames=2,
                              transfer_syntax=uid.RLELossless),
          dw.ultrasound_dicom(grey(8, 10), preamble=False,
                              transfer_syntax=uid.ImplicitVRLittleEndian)]


@st.composite
def mutated(draw):
  data = bytearray(draw(st.sampled_from(_SEEDS)))
  for _ in range(draw(st.integers(1, 6))):
    at = draw(st.integers(0, len(data) - 1))
    data[at] = draw(st.integers(0, 255))
  return bytes(data[:draw(st.integers(0, len(data)))])


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(mutated(), st.binary(max_size=400)))
def test_reader_only_raises_member_errors(data):
  if not dicom.is_dicom(data):
    return
  try:
    header = dicom.read_header(data, 10_000)
  except MemberError as e:
    assert e.kind in KINDS
    return
  frames = dicom.iter_frames(data, header, max_frames=4)
  for _ in range(8):
    try:
      frame = next(frames)
    except StopIteration:
      break
    except MemberError as e:
      assert e.kind in KINDS
      continue
    assert frame.pixels.dtype == np.uint8


# --- the acceptance archive -------------------------------------------------

def busi_like_zip(path, count=8):
  """A BUSI-layout zip: grey-as-RGB PNGs, one colour PNG, and masks."""
  rng = np.random.default_rng(11)
  with zipfile.ZipFile(path, "w") as z:
    for k in range(count):
      label = ("benign", "malignant", "normal")[k % 3]
      rows, columns = int(rng.integers(30, 50)), int(rng.integers(31, 61))
      image = rng.integers(0, 256, (rows, columns), dtype=np.uint8)
      image = np.repeat(image[..., None], 3, axis=2)
      if k == 4:
        image[..., 2] = 255 - image[..., 2]  # a colour one
      stem = f"Dataset_BUSI_with_GT/{label}/{label} ({k + 1})"
      z.writestr(stem + ".png", png(image))
      z.writestr(stem + "_mask.png", png(np.zeros((rows, columns),
                                                  np.uint8)))


def test_archive_round_trips_every_recipe(tmp_path, monkeypatch):
  source = tmp_path / "busi.zip"
  busi_like_zip(source, count=len(dicom_archive.RECIPES))
  # Every recipe once, in order, and a cine every third file.
  monkeypatch.setattr(dicom_archive, "MULTI_FRAME_EVERY", 3)
  output = str(tmp_path / "dicom.zip")
  sidecar = dicom_archive.build(str(source), output, seed=1)
  assert len(sidecar) == len(dicom_archive.RECIPES)
  with open(output + ".json") as f:
    assert json.load(f) == sidecar
  recipes = set()
  with zipfile.ZipFile(output) as z, zipfile.ZipFile(source) as src:
    assert sorted(z.namelist()) == sorted(sidecar)
    for member, entry in sidecar.items():
      assert member.split("/")[0] == entry["label"]
      assert "_mask" not in entry["original"]
      recipes.add((entry["photometric"], entry["transfer_syntax"],
                   entry["bits_stored"], entry["planar"], entry["preamble"]))
      data = z.read(member)
      original = cv2.cvtColor(cv2.imdecode(np.frombuffer(
          src.read(entry["original"]), np.uint8), cv2.IMREAD_COLOR),
                              cv2.COLOR_BGR2RGB)
      header, frames = decode(data)
      assert list(header.region) == entry["region"]
      assert header.frames == entry["frames"] == len(frames)
      assert dw.PHI["PatientName"].encode() in data
      for frame in frames:
        pixels = frame.pixels
        if pixels.ndim == 2:
          pixels = np.repeat(pixels[..., None], 3, axis=2)
        assert pixels.shape == original.shape, member
        diff = np.abs(pixels.astype(int) - original)
        assert diff.max() == 0 if entry["exact"] else diff.mean() < 3, member
      whole = next(dicom.iter_frames(data, header._replace(region=None)))
      assert whole.pixels.shape[:2] == tuple(entry["canvas"])
  assert len(recipes) >= len(dicom_archive.RECIPES) - 1  # colour fallback


def test_archive_is_deterministic_and_adds_the_corpus(tmp_path):
  source = tmp_path / "busi.zip"
  busi_like_zip(source, count=6)
  digests = []
  for name in ("a.zip", "b.zip"):
    output = str(tmp_path / name)
    dicom_archive.main(["--input", str(source), "--output", output,
                        "--count", "3", "--seed", "5", "--pydicom_corpus"])
    with open(output, "rb") as f, open(output + ".json", "rb") as g:
      digests.append((f.read(), g.read()))
  assert digests[0] == digests[1]
  with zipfile.ZipFile(tmp_path / "a.zip") as z:
    names = z.namelist()
  assert sum(not n.startswith("pydicom_corpus/") for n in names) == 3
  corpus_members = {n for n in names if n.startswith("pydicom_corpus/")}
  assert "pydicom_corpus/CT_small.dcm" in corpus_members
  assert len(corpus_members) >= len(corpus_files())
