"""Composite transforms of the preprocessing stage: archives → image records.

Each stage is a small named PTransform; the per-element work is in
`archives`, `imaging` and `quality`.
"""

from typing import (Dict, Iterable, NamedTuple, Optional, Sequence, Tuple,
                    Union)

import apache_beam as beam

import schemas
from beam_pipeline import inputs, progress
from beam_pipeline.errors import ERRORS, error_row
from busi_core import archives, dicom, imaging, pseudonyms, quality
from busi_core.errors import MemberError
from schemas import records

MASKS = "masks"
# DecodeMember's tagged output of (extra outcomes, frames left unread) per
# multi-frame DICOM: a member that becomes N frame rows adds N - 1 outcomes
# to the manifest's invariant, and --max_frames_per_file leaves frames unread.
FRAMES = "frames"


class TarInput(NamedTuple):
  uri: str


class FileInput(NamedTuple):
  uri: str


WorkItem = Union[archives.ZipRange, TarInput, FileInput]


class PreprocessLimits(NamedTuple):
  """Image size, the limits that keep hostile inputs harmless, and where the
  image-quality flags fire."""
  image_size: int
  max_pixels: int = imaging.DEFAULT_MAX_PIXELS
  archive: archives.Limits = archives.Limits()
  zip_chunk_size: int = archives.DEFAULT_ZIP_CHUNK
  quality_thresholds: quality.QualityThresholds = (
      quality.QualityThresholds())
  dicom: "DicomSettings" = None


class DicomSettings(NamedTuple):
  """How DICOM members are read."""
  # Most frames read from one multi-frame file (the first ones); None: all.
  max_frames: Optional[int] = None
  # HMAC key of study_key / series_key (busi_core.pseudonyms); None: the
  # columns stay null.
  hmac_key: Optional[bytes] = None


def frame_source(source: str, frame: Optional[int]) -> str:
  """The `source` of one frame of a multi-frame DICOM: `...#frame=N`."""
  return source if frame is None else f"{source}#frame={frame}"


def frame_image_id(member_id: str, frame: Optional[int]) -> str:
  """The image_id of one frame: sha256 of the member's id and the frame.

  A single-frame image keeps the sha256 of its bytes, as every other image.
  """
  if frame is None:
    return member_id
  return imaging.image_id(f"{member_id}#frame={frame}".encode())


class PlanWork(beam.DoFn):
  """Input path → units of work: zip member ranges, whole tars, plain files.

  Takes paths as `inputs.encode` gives them. A path that is not a readable
  file (a folder, FIFO, broken link, vanished input) or a zip that cannot be
  opened becomes an error Member here (one member seen).
  """

  def __init__(self, zip_chunk_size: int, max_members: int):
    self._chunk = zip_chunk_size
    self._max_members = max_members

  def process(self, element: bytes
             ) -> Iterable[Union[WorkItem, archives.Member]]:
    uri = inputs.decode(element)
    problem = inputs.unreadable(uri)
    # Each member this path becomes is expected once (the progress line's
    # ETA): all are known before the shuffle that precedes decoding.
    if problem:
      progress.expect()
      yield archives.Member(archives.display_uri(uri), uri, "error", error=problem)
      return
    kind = archives.archive_kind(uri)
    if kind == archives.ZIP:
      try:
        count = archives.count_zip_members(uri, self._max_members)
      except MemberError as e:
        progress.expect()
        yield archives.Member(archives.display_uri(uri), uri, "error",
                              error=archives.read_failure(uri, e))
        return
      except Exception as e:  # pylint: disable=broad-except
        progress.expect()
        yield archives.Member(
            archives.display_uri(uri), uri, "error",
            error=archives.read_failure(uri, MemberError(
                "ReadFailed", f"{type(e).__name__}: {e}")))
        return
      progress.expect(count)
      yield from archives.split_zip(uri, count, self._chunk)
    elif kind == archives.TAR:
      yield TarInput(uri)  # its members are expected as ReadTars lists them
    else:
      progress.expect()
      yield FileInput(uri)


class ReadTars(beam.DoFn):
  """Streams each tar into its Members; other work items pass unchanged.

  A tar has no index, so one worker must read it from start to end; its
  members are then redistributed, with the other (small) work items, by the
  one shuffle before decoding.
  """

  def __init__(self, limits: archives.Limits):
    self._limits = limits

  def process(self, item):
    if isinstance(item, TarInput):
      for member in archives.read_tar(item.uri, self._limits):
        progress.expect()
        yield member
    else:
      yield item


class ReadMembers(beam.DoFn):
  """Work item → Members: reads zip ranges and plain files; Members pass."""

  def __init__(self, limits: archives.Limits):
    self._limits = limits
    self._zips = None

  def setup(self):
    # Ranges of one zip mostly reach the same worker one after another;
    # keeping it open saves re-reading its central directory for each range.
    self._zips = archives.OpenZipCache()

  def teardown(self):
    if self._zips is not None:
      self._zips.close()

  def process(self, item):
    if isinstance(item, archives.Member):
      members = [item]
    elif isinstance(item, archives.ZipRange):
      members = archives.read_zip_range(item, self._limits, self._zips)
    else:
      members = [archives.read_file(item.uri, self._limits.max_member_bytes)]
    for member in members:
      progress.count(schemas.COUNTER_MEMBERS_SEEN)
      yield member


class DecodeMember(beam.DoFn):
  """Member → serialized Example (main), mask source (MASKS) or error row.

  Each image's quality flags (`quality.check`) go into its Example and are
  counted, one counter per flag (`schemas.quality_counter`).
  """

  def __init__(self, image_size: int, max_pixels: int, run_id: str,
               thresholds: quality.QualityThresholds = (
                   quality.QualityThresholds()),
               dicom_settings: Optional[DicomSettings] = None):
    self._size = image_size
    self._max_pixels = max_pixels
    self._run_id = run_id
    self._thresholds = thresholds
    self._dicom = dicom_settings or DicomSettings()

  def process(self, member: archives.Member):
    if member.kind == "mask":
      progress.count(schemas.COUNTER_MASKS_SKIPPED)
      yield beam.pvalue.TaggedOutput(MASKS, member.source)
      return
    if member.kind == "dir":
      yield self._error(member.source, "Directory",
                        "directory entry, not an image", schemas.Stage.EXTRACT)
      return
    if member.kind == "error":
      stage = (schemas.Stage.READ if member.source == member.path or
               "!/" not in member.source else schemas.Stage.EXTRACT)
      yield self._error(member.source, member.error.kind, str(member.error),
                        stage)
      return
    if member.data and dicom.is_dicom(member.data):
      yield from self._decode_dicom(member)
      return
    try:
      decoded = imaging.decode_and_resize(member.data, self._size,
                                          self._max_pixels, keep_grey=True)
      example, flags = self._example(decoded, imaging.image_id(member.data),
                                     member.source,
                                     imaging.label_from_path(member.path))
    except MemberError as e:
      yield self._error(member.source, e.kind, str(e))
      return
    except Exception as e:  # pylint: disable=broad-except
      # OpenCV raises cv2.error on some malformed inputs; never crash the run.
      yield self._error(member.source, type(e).__name__, str(e))
      return
    self._count_decoded(flags)
    yield example

  def _example(self, decoded: imaging.DecodedImage, image_id: str,
               source: str, label: str, burned_in_annotation: bool = False,
               **dicom_fields) -> Tuple[bytes, Tuple[str, ...]]:
    """A decoded image's quality flags and its serialized Example.

    Serialized here, in the step that decoded it: between steps an Example
    moves as plain bytes, far cheaper for Beam to pass than a pickled array.
    `dicom_fields` are ImageRecord's frame, study_key, series_key and
    region_cropped.
    """
    flags = quality.check(decoded.pixels, decoded.original_height,
                          decoded.original_width, self._thresholds,
                          burned_in_annotation=burned_in_annotation)
    return records.to_example(records.ImageRecord(
        image_id=image_id,
        source=source,
        label=label,
        pixels=decoded.pixels,
        original_height=decoded.original_height,
        original_width=decoded.original_width,
        quality_flags=quality.join(flags),
        **dicom_fields)), flags

  @staticmethod
  def _count_decoded(flags: Sequence[str]) -> None:
    progress.count(schemas.COUNTER_IMAGES_DECODED)
    for name in flags:
      progress.count(schemas.quality_counter(name))

  def _error(self, source: str, kind: str, message: str,
             stage: schemas.Stage = schemas.Stage.DECODE):
    progress.count(schemas.COUNTER_DECODE_ERRORS)
    return beam.pvalue.TaggedOutput(ERRORS, error_row(
        source, stage, kind, message, self._run_id))

  def _decode_dicom(self, member: archives.Member):
    """A DICOM member → one Example (or error row) per frame read.

    Nothing from the header but the pixels, the frame number, Burned In
    Annotation and the keyed study/series pseudonyms reaches the record; the
    error messages are `busi_core.dicom`'s, which carry no header text.
    """
    try:
      header = dicom.read_header(member.data, self._max_pixels)
    except MemberError as e:
      yield self._error(member.source, e.kind, str(e))
      return
    except Exception as e:  # pylint: disable=broad-except
      # The exception's text may quote the header: only its type is kept.
      yield self._error(member.source, "CorruptImage",
                        f"unreadable DICOM ({type(e).__name__})")
      return
    member_id = imaging.image_id(member.data)
    label = imaging.label_from_path(member.path)
    key = self._dicom.hmac_key
    study_key = pseudonyms.pseudonym(key, header.study_uid)
    series_key = pseudonyms.pseudonym(key, header.series_uid)
    wanted = header.frames
    if self._dicom.max_frames is not None:
      wanted = min(wanted, self._dicom.max_frames)
    progress.expect(wanted - 1)
    outcomes = 0
    frames = dicom.iter_frames(member.data, header, self._dicom.max_frames)
    while True:
      # A frame that fails is its own error row and the next one is tried
      # (iter_frames goes on after a MemberError); a file that cannot be
      # read at all raises once and ends.
      try:
        frame = next(frames)
      except StopIteration:
        break
      except MemberError as e:
        outcomes += 1
        number = frames.last_number if header.multi_frame else None
        yield self._error(frame_source(member.source, number), e.kind, str(e))
        continue
      except Exception as e:  # pylint: disable=broad-except
        # Not expected from iter_frames; its text may quote the header.
        outcomes += 1
        number = frames.last_number if header.multi_frame else None
        yield self._error(frame_source(member.source, number), "CorruptImage",
                          f"DICOM frame not decoded ({type(e).__name__})")
        break
      outcomes += 1
      number = frame.number
      source = frame_source(member.source, number)
      try:
        decoded = imaging.resize_pixels(frame.pixels, self._size,
                                        keep_grey=True)
        example, flags = self._example(
            decoded, frame_image_id(member_id, number), source, label,
            header.burned_in_annotation, frame=number, study_key=study_key,
            series_key=series_key, region_cropped=frame.region_cropped)
      except MemberError as e:
        yield self._error(source, e.kind, str(e))
        continue
      except Exception as e:  # pylint: disable=broad-except
        yield self._error(source, type(e).__name__, str(e)[:500])
        continue
      self._count_decoded(flags)
      yield example
    if not outcomes:  # never expected: the member must still be accounted
      outcomes = 1
      yield self._error(member.source, "CorruptImage",
                        "no frame of the DICOM could be read")
    skipped = header.frames - wanted
    if outcomes > 1 or skipped:
      yield beam.pvalue.TaggedOutput(FRAMES, (outcomes - 1, skipped))


def _sum_pairs(pairs: Iterable) -> tuple:
  extra = skipped = 0
  for a, b in pairs:
    extra += a
    skipped += b
  return extra, skipped


def _extra_frames(pair: tuple) -> int:
  return pair[0]


def _frames_skipped(pair: tuple) -> int:
  return pair[1]


class ReadImages(beam.PTransform):
  """Input paths → serialized Examples, mask sources, error rows, counts.

  Takes the paths matched at launch (`inputs.match_inputs`), each read once.
  Returns a dict: "examples" (serialized tf.train.Example bytes), "masks"
  (str), "errors" (error rows) and "members_seen" (a singleton count of the
  archive entries and input files read).
  """

  def __init__(self, paths, limits: PreprocessLimits, run_id: str):
    super().__init__()
    self._paths = [inputs.encode(path) for path in paths]
    self._limits = limits
    self._run_id = run_id

  def expand(self, pbegin):
    limits = self._limits
    work = (
        pbegin
        | "Paths" >> beam.Create(self._paths)
        | "PlanWork" >> beam.ParDo(PlanWork(limits.zip_chunk_size,
                                            limits.archive.max_members))
        | "ReadTars" >> beam.ParDo(ReadTars(limits.archive))
        # Spreads zip ranges, plain files and tar members over workers. Zip
        # members are read after this shuffle, so their bytes never cross it.
        | "SpreadWork" >> beam.Reshuffle())
    members = work | "ReadMembers" >> beam.ParDo(
        ReadMembers(limits.archive))
    decoded = members | "DecodeImages" >> beam.ParDo(DecodeMember(
        limits.image_size, limits.max_pixels, self._run_id,
        limits.quality_thresholds, limits.dicom)).with_outputs(
            MASKS, ERRORS, FRAMES, main="examples")
    frames = decoded[FRAMES] | "SumFrames" >> beam.CombineGlobally(
        _sum_pairs)
    return {
        "examples": decoded.examples,
        "masks": decoded[MASKS],
        "errors": decoded[ERRORS],
        "extra_frames": frames | "ExtraFrames" >> beam.Map(_extra_frames),
        "frames_skipped": frames | "FramesSkipped" >> beam.Map(
            _frames_skipped),
        "members_seen": members | "CountMembers" >> (
            beam.combiners.Count.Globally()),
    }
