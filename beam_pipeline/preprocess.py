"""Composite transforms of the preprocessing stage: archives → image records.

Each stage is a small named PTransform; the per-element work is in
`archives`, `imaging` and `quality`.
"""

from typing import Dict, Iterable, NamedTuple, Optional, Union

import apache_beam as beam

import schemas
from beam_pipeline import inputs, progress
from beam_pipeline.errors import ERRORS, error_row
from busi_core import archives, imaging, quality
from busi_core.errors import MemberError
from schemas import records

MASKS = "masks"


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
                   quality.QualityThresholds())):
    self._size = image_size
    self._max_pixels = max_pixels
    self._run_id = run_id
    self._thresholds = thresholds

  def process(self, member: archives.Member):
    if member.kind == "mask":
      progress.count(schemas.COUNTER_MASKS_SKIPPED)
      yield beam.pvalue.TaggedOutput(MASKS, member.source)
      return
    if member.kind == "dir":
      progress.count(schemas.COUNTER_DECODE_ERRORS)
      yield beam.pvalue.TaggedOutput(ERRORS, error_row(
          member.source, schemas.Stage.EXTRACT, "Directory",
          "directory entry, not an image", self._run_id))
      return
    if member.kind == "error":
      progress.count(schemas.COUNTER_DECODE_ERRORS)
      stage = (schemas.Stage.READ if member.source == member.path or
               "!/" not in member.source else schemas.Stage.EXTRACT)
      yield beam.pvalue.TaggedOutput(ERRORS, error_row(
          member.source, stage, member.error.kind, str(member.error),
          self._run_id))
      return
    try:
      decoded = imaging.decode_and_resize(member.data, self._size,
                                          self._max_pixels, keep_grey=True)
      flags = quality.check(decoded.pixels, decoded.original_height,
                            decoded.original_width, self._thresholds)
      # Serialized here, in the step that decoded it: between steps an
      # Example moves as plain bytes, far cheaper for Beam to pass than a
      # pickled array.
      example = records.to_example(records.ImageRecord(
          image_id=imaging.image_id(member.data),
          source=member.source,
          label=imaging.label_from_path(member.path),
          pixels=decoded.pixels,
          original_height=decoded.original_height,
          original_width=decoded.original_width,
          quality_flags=quality.join(flags)))
    except MemberError as e:
      progress.count(schemas.COUNTER_DECODE_ERRORS)
      yield beam.pvalue.TaggedOutput(ERRORS, error_row(
          member.source, schemas.Stage.DECODE, e.kind, str(e), self._run_id))
      return
    except Exception as e:  # pylint: disable=broad-except
      # OpenCV raises cv2.error on some malformed inputs; never crash the run.
      progress.count(schemas.COUNTER_DECODE_ERRORS)
      yield beam.pvalue.TaggedOutput(ERRORS, error_row(
          member.source, schemas.Stage.DECODE, type(e).__name__, str(e),
          self._run_id))
      return
    progress.count(schemas.COUNTER_IMAGES_DECODED)
    for name in flags:
      progress.count(schemas.quality_counter(name))
    yield example


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
        limits.quality_thresholds)).with_outputs(
            MASKS, ERRORS, main="examples")
    return {
        "examples": decoded.examples,
        "masks": decoded[MASKS],
        "errors": decoded[ERRORS],
        "members_seen": members | "CountMembers" >> (
            beam.combiners.Count.Globally()),
    }
