"""Ultrasound DICOM files made in memory, for the tests and the bench archive.

Every file carries made-up patient data (`PHI`): distinctive values that a
test can search for in error messages, logs and outputs. Pixels go in as
given; nothing is read from the network.

  data = ultrasound_dicom(np.zeros((480, 640), np.uint8))
  data = ultrasound_dicom(rgb, photometric="YBR_FULL_422",
                          transfer_syntax=RLELossless)
  data = wrap_png(png_bytes)  # a PNG's exact pixels as a DICOM
"""

import hashlib
import io
from typing import Dict, Optional, Sequence, Tuple

import cv2
import numpy as np
import pydicom
from PIL import Image
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (UID, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless,
                         MPEG4HP41, RLELossless, generate_uid)

US_IMAGE = UID("1.2.840.10008.5.1.4.1.1.6.1")
US_MULTIFRAME = UID("1.2.840.10008.5.1.4.1.1.3.1")
BASIC_TEXT_SR = UID("1.2.840.10008.5.1.4.1.1.88.11")

# Made-up, distinctive patient data: each value is unlikely to appear in
# any message by chance, so finding one means a header value leaked.
PHI: Dict[str, str] = {
    "PatientName": "ZZPHI-NAME^Alice^Quetzal",
    "PatientID": "PHI0424242",
    "PatientBirthDate": "19710203",
    "AccessionNumber": "ZZACC7781",
    "OtherPatientIDs": "ZZOTHERID5150",
    "PatientAddress": "ZZPHI 17 Quetzal Lane, Xyloville",
    "PatientComments": "ZZPHI patient comment about Alice",
    "AdditionalPatientHistory": "ZZPHI history of lump left breast",
    "InstitutionName": "ZZPHI Xyloville General Hospital",
    "InstitutionAddress": "ZZPHI 99 Hospital Rd, Xyloville",
    "ReferringPhysicianName": "ZZPHI-REF^Bob",
    "OperatorsName": "ZZPHI-OPER^Carol",
    "PerformingPhysicianName": "ZZPHI-PERF^Dave",
    "StationName": "ZZSTATION41",
    "StudyDescription": "ZZPHI breast US study of Alice",
    "SeriesDescription": "ZZPHI left breast series",
    "ImageComments": "ZZPHI lesion at 2 o'clock, Alice",
    "StudyDate": "19880317",
    "SeriesDate": "19880318",
    "AcquisitionDate": "19880319",
    "ContentDate": "19880321",
    "StudyTime": "134711.4242",
    "SeriesTime": "134712.4242",
    "ContentTime": "134713.4242",
    "StudyID": "ZZSTUDY99",
    "DeviceSerialNumber": "ZZSERIAL31337",
}
# Also hidden inside sequences, so a scrubber must walk them.
NESTED_PHI = {
    "RequestedProcedureDescription": "ZZPHI requested procedure for Alice",
    "RequestedProcedureID": "ZZREQ6060",
}

_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422")
_PALETTE = "PALETTE COLOR"
# Never GDCM: its RLE encoder aborts the process on some frame sizes.
_ENCODERS = {RLELossless: "pydicom", JPEG2000Lossless: "pylibjpeg",
             JPEGLSLossless: "pyjpegls"}
# (x0, y0, x1, y1, spatial_format, data_type), coordinates inclusive.
Region = Tuple[int, int, int, int, int, int]


def _uid(*parts) -> UID:
  """A UID derived from `parts`: same inputs, same UID."""
  return generate_uid(entropy_srcs=[str(p) for p in parts])


def _base_dataset(sop_class: UID, phi: Optional[Dict[str, str]],
                  study_uid: Optional[str], series_uid: Optional[str],
                  seed: str) -> Dataset:
  ds = Dataset()
  ds.SpecificCharacterSet = "ISO_IR 100"
  ds.SOPClassUID = sop_class
  ds.SOPInstanceUID = _uid("instance", seed)
  ds.StudyInstanceUID = study_uid or _uid("study", seed)
  ds.SeriesInstanceUID = series_uid or _uid("series", seed)
  ds.Modality = "US" if sop_class != BASIC_TEXT_SR else "SR"
  ds.Manufacturer = "bench.dicom_writer"
  ds.SeriesNumber = 1
  ds.InstanceNumber = 1
  for keyword, value in (phi or {}).items():
    setattr(ds, keyword, value)
  if phi:
    request = Dataset()
    for keyword, value in NESTED_PHI.items():
      setattr(request, keyword, value)
    ds.RequestAttributesSequence = DicomSequence([request])
  return ds


def _regions(regions: Sequence[Region]) -> DicomSequence:
  items = []
  for x0, y0, x1, y1, spatial_format, data_type in regions:
    item = Dataset()
    item.RegionSpatialFormat = spatial_format
    item.RegionDataType = data_type
    item.RegionFlags = 0
    item.RegionLocationMinX0 = x0
    item.RegionLocationMinY0 = y0
    item.RegionLocationMaxX1 = x1
    item.RegionLocationMaxY1 = y1
    item.PhysicalUnitsXDirection = 3  # cm
    item.PhysicalUnitsYDirection = 3
    item.PhysicalDeltaX = 0.01
    item.PhysicalDeltaY = 0.01
    items.append(item)
  return DicomSequence(items)


def _ybr_422(rgb: np.ndarray) -> bytes:
  """RGB frame → YBR_FULL_422 bytes: Y0 Y1 Cb Cr per pair of pixels.

  Chroma is the mean of the pair (PS3.3 C.7.6.3.1.2).
  """
  if rgb.shape[1] % 2:
    raise ValueError("YBR_FULL_422 needs an even number of columns")
  ybr = convert_color_space(rgb, "RGB", "YBR_FULL").astype(np.int32)
  pairs = ybr.reshape(ybr.shape[0], -1, 2, 3)
  out = np.empty((ybr.shape[0], pairs.shape[1], 4), np.uint8)
  out[..., 0] = pairs[:, :, 0, 0]
  out[..., 1] = pairs[:, :, 1, 0]
  out[..., 2] = (pairs[:, :, 0, 1] + pairs[:, :, 1, 1] + 1) // 2
  out[..., 3] = (pairs[:, :, 0, 2] + pairs[:, :, 1, 2] + 1) // 2
  return out.tobytes()


def _jpeg(frame: np.ndarray, photometric: str) -> bytes:
  """One frame as a baseline JPEG (Pillow), quality 95.

  RGB input becomes YCbCr inside the JPEG: 4:4:4 for YBR_FULL, 4:2:2 for
  YBR_FULL_422 (the photometric a DICOM must then declare).
  """
  out = io.BytesIO()
  image = Image.fromarray(frame)
  subsampling = 1 if photometric == "YBR_FULL_422" else 0
  image.save(out, format="JPEG", quality=95, subsampling=subsampling)
  return out.getvalue()


def ultrasound_dicom(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    frames: Optional[int] = None,
    regions: Optional[Sequence[Region]] = None,
    phi: Optional[Dict[str, str]] = PHI,
    burned_in: Optional[str] = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    bits_stored: int = 8,
    signed: bool = False,
    rescale: Optional[Tuple[float, float]] = None,
    window: Optional[Tuple[float, float]] = None,
    palette: Optional[np.ndarray] = None,
    palette_bits: int = 16,
    planar: int = 0,
    preamble: bool = True,
    study_uid: Optional[str] = None,
    series_uid: Optional[str] = None,
) -> bytes:
  """An ultrasound DICOM file (US Image, or US Multi-frame Image) as bytes.

  Args:
    pixels: [H, W] grey or palette indices, or [H, W, 3] RGB; with
      `frames`, [N, H, W(, 3)]. Grey values are stored as given (uint8, or
      uint16/int16 within `bits_stored`); RGB is uint8 and converted for
      the YBR photometrics.
    photometric: MONOCHROME2, MONOCHROME1 (values stored as given, so a
      reader must invert), RGB, YBR_FULL, YBR_FULL_422 or PALETTE COLOR.
    frames: number of frames of a multi-frame file (pixels[0] has them).
    regions: SequenceOfUltrasoundRegions items, (x0, y0, x1, y1,
      RegionSpatialFormat, RegionDataType), coordinates inclusive.
    phi: patient/study values to write (default `PHI`; None for none).
    burned_in: BurnedInAnnotation value, absent when None.
    transfer_syntax: Implicit/Explicit VR Little Endian, Explicit VR Big
      Endian, RLE Lossless, JPEG Baseline (8-bit; frames encoded with
      Pillow), JPEG 2000 Lossless, JPEG-LS Lossless (pydicom's encoders).
    bits_stored: BitsStored (BitsAllocated 8 up to 8 bits, else 16).
    signed: PixelRepresentation 1 (two's complement).
    rescale: (RescaleSlope, RescaleIntercept).
    window: (WindowCenter, WindowWidth).
    palette: [K, 3] uint8 colours for PALETTE COLOR (index → colour).
    palette_bits: 8 or 16 bits per LUT entry (16: colour × 257).
    planar: PlanarConfiguration of uncompressed RGB/YBR_FULL.
    preamble: False writes a bare dataset: no preamble, no file meta.
    study_uid: StudyInstanceUID (default derived from the pixels).
    series_uid: SeriesInstanceUID (default derived from the pixels).

  Returns:
    The file's bytes.
  """
  pixels = np.asarray(pixels)
  stack = pixels if frames is not None else pixels[np.newaxis]
  if frames is not None and len(stack) != frames:
    raise ValueError(f"pixels hold {len(stack)} frames, not {frames}")
  colour = photometric in _COLOUR
  if stack.ndim != (4 if colour else 3):
    raise ValueError(f"pixels of shape {pixels.shape} for {photometric}")
  count, rows, columns = stack.shape[:3]
  seed = hashlib.sha256(stack.tobytes()).hexdigest()[:16] + photometric
  sop_class = US_MULTIFRAME if frames is not None else US_IMAGE
  ds = _base_dataset(sop_class, phi, study_uid, series_uid, seed)
  ds.Rows, ds.Columns = rows, columns
  ds.SamplesPerPixel = 3 if colour else 1
  ds.PhotometricInterpretation = photometric
  bits_allocated = 8 if bits_stored <= 8 else 16
  ds.BitsAllocated = bits_allocated
  ds.BitsStored = bits_stored
  ds.HighBit = bits_stored - 1
  ds.PixelRepresentation = 1 if signed else 0
  if colour:
    ds.PlanarConfiguration = planar
  if frames is not None:
    ds.NumberOfFrames = frames
    ds.FrameTime = 33.3
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
  if regions:
    ds.SequenceOfUltrasoundRegions = _regions(regions)
  if burned_in is not None:
    ds.BurnedInAnnotation = burned_in
  if rescale is not None:
    ds.RescaleSlope, ds.RescaleIntercept = (f"{rescale[0]:g}",
                                            f"{rescale[1]:g}")
    ds.RescaleType = "US"
  if window is not None:
    ds.WindowCenter, ds.WindowWidth = f"{window[0]:g}", f"{window[1]:g}"
  if photometric == _PALETTE:
    _set_palette(ds, palette, palette_bits)

  syntax = UID(transfer_syntax)
  dtype = np.dtype(np.uint8 if bits_allocated == 8 else (
      np.int16 if signed else np.uint16))
  if bits_allocated == 8 and signed:
    dtype = np.dtype(np.int8)
  stored = stack.astype(dtype)
  if syntax in (RLELossless, JPEG2000Lossless, JPEGLSLossless):
    if photometric not in _MONOCHROME + ("RGB", _PALETTE):
      raise ValueError(f"write {photometric} uncompressed or as JPEG")
    if colour:
      ds.PlanarConfiguration = 0  # what the encoders take
    ds.compress(syntax, stored if frames is not None else stored[0],
                encoding_plugin=_ENCODERS[syntax],
                generate_instance_uid=False)
  elif syntax == JPEGBaseline8Bit:
    if bits_allocated != 8:
      raise ValueError("JPEG Baseline is 8-bit")
    if colour and photometric == "RGB":
      photometric = ds.PhotometricInterpretation = "YBR_FULL"
    if colour:
      ds.PlanarConfiguration = 0
    ds.PixelData = encapsulate([_jpeg(f, photometric) for f in stored])
    ds["PixelData"].VR = "OB"
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
  else:
    ds.PixelData = _native_bytes(stored, photometric, planar, syntax)
    ds["PixelData"].VR = "OW" if bits_allocated > 8 else "OB"
  return _to_bytes(ds, syntax, preamble)


def _native_bytes(stored: np.ndarray, photometric: str, planar: int,
                  syntax: UID) -> bytes:
  """Uncompressed pixel data of all frames, in the syntax's byte order."""
  chunks = []
  for frame in stored:
    if photometric == "YBR_FULL_422":
      chunks.append(_ybr_422(frame))
      continue
    if photometric == "YBR_FULL":
      frame = convert_color_space(frame, "RGB", "YBR_FULL")
    if frame.ndim == 3 and planar == 1:
      frame = frame.transpose(2, 0, 1)
    if syntax == ExplicitVRBigEndian:
      frame = frame.astype(frame.dtype.newbyteorder(">"))
    chunks.append(np.ascontiguousarray(frame).tobytes())
  data = b"".join(chunks)
  return data + b"\0" * (len(data) % 2)


def _set_palette(ds: Dataset, palette: Optional[np.ndarray],
                 bits: int) -> None:
  if palette is None:
    raise ValueError("PALETTE COLOR needs a palette")
  lut = np.asarray(palette, np.uint8)
  entries = len(lut)
  for index, name in enumerate(("Red", "Green", "Blue")):
    setattr(ds, f"{name}PaletteColorLookupTableDescriptor",
            [entries % 65536, 0, bits])
    values = lut[:, index].astype(np.uint16)
    if bits == 16:
      data = (values * 257).astype("<u2").tobytes()
    else:
      data = values.astype(np.uint8).tobytes()
      data += b"\0" * (len(data) % 2)
    setattr(ds, f"{name}PaletteColorLookupTableData", data)
    ds[f"{name}PaletteColorLookupTableData"].VR = "OW"


def _to_bytes(ds: Dataset, syntax: UID, preamble: bool) -> bytes:
  """The dataset as a DICOM file, or as a bare dataset without preamble."""
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = ds.SOPClassUID
  meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
  meta.TransferSyntaxUID = syntax
  meta.ImplementationClassUID = _uid("bench.dicom_writer")
  out = io.BytesIO()
  if preamble:
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
  else:
    if syntax.is_encapsulated or syntax.is_deflated:
      raise ValueError("a bare dataset must be uncompressed")
    ds.preamble = None
    ds.file_meta = FileMetaDataset()
    pydicom.dcmwrite(out, ds, implicit_vr=syntax.is_implicit_VR,
                     little_endian=syntax.is_little_endian)
  return out.getvalue()


def wrap_png(png_bytes: bytes, phi: Optional[Dict[str, str]] = PHI,
             regions: Optional[Sequence[Region]] = None,
             **kwargs) -> bytes:
  """A PNG's exact pixels as an uncompressed ultrasound DICOM.

  Grey PNGs become MONOCHROME2 (8 or 16 bits), colour ones RGB (alpha
  dropped).

  Args:
    png_bytes: the PNG file.
    phi: patient/study values to write (default `PHI`).
    regions: SequenceOfUltrasoundRegions items, see `ultrasound_dicom`.
    **kwargs: passed on to `ultrasound_dicom` (transfer_syntax, ...).

  Returns:
    The DICOM file's bytes.
  """
  image = cv2.imdecode(np.frombuffer(png_bytes, np.uint8),
                       cv2.IMREAD_UNCHANGED)
  if image is None:
    raise ValueError("not a decodable PNG")
  bits = 16 if image.dtype == np.uint16 else 8
  if image.ndim == 3 and image.shape[2] == 1:
    image = image[:, :, 0]
  if image.ndim == 2:
    return ultrasound_dicom(image, photometric="MONOCHROME2", phi=phi,
                            regions=regions, bits_stored=bits, **kwargs)
  if bits != 8:
    raise ValueError("16-bit colour PNGs are not wrapped")
  code = cv2.COLOR_BGRA2RGB if image.shape[2] == 4 else cv2.COLOR_BGR2RGB
  return ultrasound_dicom(cv2.cvtColor(image, code), photometric="RGB",
                          phi=phi, regions=regions, **kwargs)


def no_pixel_dicom(phi: Optional[Dict[str, str]] = PHI) -> bytes:
  """A Basic Text SR (a report: no pixel data) with `phi` in it."""
  ds = _base_dataset(BASIC_TEXT_SR, phi, None, None, "report")
  ds.ValueType = "CONTAINER"
  ds.ContinuityOfContent = "SEPARATE"
  text = Dataset()
  text.RelationshipType = "CONTAINS"
  text.ValueType = "TEXT"
  text.TextValue = "ZZPHI findings for Alice: BI-RADS 4"
  ds.ContentSequence = DicomSequence([text])
  return _to_bytes(ds, ExplicitVRLittleEndian, True)


def video_dicom(syntax: str = MPEG4HP41,
                phi: Optional[Dict[str, str]] = PHI) -> bytes:
  """A multi-frame US DICOM claiming a video syntax (a fake bitstream)."""
  ds = _base_dataset(US_MULTIFRAME, phi, None, None, "video" + syntax)
  ds.Rows, ds.Columns = 480, 640
  ds.SamplesPerPixel = 3
  ds.PhotometricInterpretation = "YBR_PARTIAL_420"
  ds.PlanarConfiguration = 0
  ds.BitsAllocated = ds.BitsStored = 8
  ds.HighBit = 7
  ds.PixelRepresentation = 0
  ds.NumberOfFrames = 30
  ds.FrameIncrementPointer = 0x00181063
  ds.FrameTime = 33.3
  ds.PixelData = encapsulate([b"\0\0\0\x01" + bytes(range(256)) * 4],
                             has_bot=False)
  ds["PixelData"].VR = "OB"
  return _to_bytes(ds, UID(syntax), True)


def _settings() -> None:
  # The writer sets values pydicom would warn about (made-up PHI is fine).
  pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE


_settings()
