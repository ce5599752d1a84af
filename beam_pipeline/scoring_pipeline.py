"""The scoring stage as PTransforms: TFRecord shards → ImageRecords
(ReadTFRecords), ImageRecords → prediction rows through RunInference
(ScoreImages, with Grad-CAM overlays); `pipeline.build` composes them."""

import datetime
import io
import logging
from typing import Dict, Optional

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import RunInference
from apache_beam.utils import shared

import schemas
from beam_pipeline import inputs, progress
from busi_core import archives, artifact, flag_rates, gradcam
from beam_pipeline import options as opts_lib
from beam_pipeline import scoring
from busi_core import tfrecord_io
from beam_pipeline import model_handler
from beam_pipeline.errors import ERRORS, error_row

GRADCAM = "gradcam"
UNREAD = "unread"

_LOG = logging.getLogger(__name__)


def _read_tfrecord_file(element: bytes, run_id: str):
  """One TFRecord file (as `inputs.encode` gives it) → (source, payload) per
  intact record.

  Each fault the reader finds is one error row (`URI#<index>`); a file that
  lost an unknown number of records is also named once on the UNREAD output.
  A path that is not a readable file (a folder, FIFO, broken link) is one
  error row; one gone since launch is an InputVanished row. Each record and
  error row is a member the run expects (the progress line's ETA).
  """
  uri = inputs.decode(element)
  source = archives.display_uri(uri)
  problem = inputs.unreadable(uri)
  if problem:
    progress.expect()
    yield beam.pvalue.TaggedOutput(ERRORS, error_row(
        source, schemas.Stage.READ, problem.kind, str(problem), run_id))
    return
  unread = False
  for item in tfrecord_io.read_file(uri):
    progress.expect()
    if isinstance(item, tfrecord_io.Record):
      progress.count(schemas.COUNTER_RECORDS_READ)
      yield f"{source}#{item.index}", item.payload
      continue
    if (item.error_type == tfrecord_io.BAD_FILE and item.index == 0 and
        archives.is_gone(uri)):
      yield beam.pvalue.TaggedOutput(ERRORS, error_row(
          source, schemas.Stage.READ, archives.VANISHED,
          str(archives.vanished()), run_id))
      return
    yield beam.pvalue.TaggedOutput(ERRORS, error_row(
        f"{source}#{item.index}", schemas.Stage.READ, item.error_type,
        item.message, run_id))
    if item.unread and not unread:
      unread = True
      yield beam.pvalue.TaggedOutput(UNREAD, source)


def _parse_record(element, run_id: str):
  """(source, payload) → ImageRecord, or an error row if malformed."""
  source, serialized = element
  try:
    yield scoring.parse_for_scoring(serialized)
  except ValueError as e:
    yield beam.pvalue.TaggedOutput(ERRORS, error_row(
        source, schemas.Stage.PARSE, "BadExample", str(e), run_id))


def _to_model_input(record, config: scoring.ScoringConfig):
  """ImageRecord → (key, pixels), or an error row for a wrong-shaped image."""
  try:
    yield scoring.keyed_input(record, config.image_size)
  except ValueError as e:
    yield beam.pvalue.TaggedOutput(ERRORS, error_row(
        record.source, schemas.Stage.INFERENCE, "WrongImageShape", str(e),
        config.run_id))


def _to_row(keyed_result, config: scoring.ScoringConfig, gradcam: str):
  """(key, PredictionResult) → a prediction row; rows chosen for Grad-CAM go
  to the GRADCAM output with their pixels; a non-finite model output (NaN or
  inf, e.g. a float16 overflow) is an error, never a confident prediction."""
  key, result = keyed_result
  output = result.inference
  values = list(output.probabilities) + (
      [] if output.ood_score is None else [output.ood_score])
  if not np.all(np.isfinite(values)):
    yield beam.pvalue.TaggedOutput(ERRORS, error_row(
        key.source, schemas.Stage.INFERENCE, "NonFiniteOutput",
        f"model output {np.asarray(output.probabilities).tolist()} (OOD"
        f" score {output.ood_score}) is not finite", config.run_id))
    return
  row = scoring.prediction_row(key, output, config,
                               datetime.datetime.now(datetime.timezone.utc))
  _count_row(row)
  if scoring.wants_gradcam(row, gradcam):
    yield beam.pvalue.TaggedOutput(GRADCAM, (row, result.example))
  else:
    yield row


def _count_row(row) -> None:
  """Beam counters of a prediction row: every row goes out exactly once
  (Grad-CAM passes it on, with or without its overlay)."""
  progress.count(schemas.COUNTER_PREDICTIONS)
  progress.count(schemas.predicted_counter(scoring.predicted_class(row)))
  for name, applies in ((schemas.COUNTER_LOW_CONFIDENCE,
                         scoring.is_low_confidence),
                        (schemas.COUNTER_OUT_OF_DISTRIBUTION,
                         scoring.is_out_of_distribution),
                        (schemas.COUNTER_NEEDS_REVIEW, scoring.needs_review)):
    if applies(row):
      progress.count(name)


class ExplainBatch(beam.DoFn):
  """Batches of (row, pixels) → rows with `gradcam_uri`, overlays written.

  Overlay files are named from the image_id and a hash of the source, never
  from a member name; rewriting one on a retried bundle is harmless. If
  Grad-CAM fails, the prediction rows still go out (without a URI) and an
  error row says why.
  """

  def __init__(self, model_dir: str, output: str,
               config: scoring.ScoringConfig):
    self._model_dir = model_dir
    self._model_sha256 = config.model_sha256
    self._output = output
    self._labels = list(config.labels)
    self._run_id = config.run_id
    # One model per worker process, shared by its threads, as RunInference
    # does for its own.
    self._shared = shared.Shared()
    self._model = None

  def setup(self):
    def load():
      return artifact.load_artifact(self._model_dir,
                                    self._model_sha256).model
    self._model = self._shared.acquire(load, tag=f"gradcam:{self._model_dir}")

  def process(self, batch):
    rows = [row for row, _ in batch]
    try:
      images = np.stack([pixels for _, pixels in batch])
      classes = [self._labels.index(row[schemas.COLUMN_PREDICTED_CLASS])
                 for row in rows]
      maps = gradcam.heatmaps(self._model, images, classes)
    except Exception as e:  # pylint: disable=broad-except
      for row in rows:
        yield beam.pvalue.TaggedOutput(ERRORS, error_row(
            row[schemas.COLUMN_SOURCE], schemas.Stage.GRADCAM,
            type(e).__name__, str(e), self._run_id))
        yield row
      return
    for row, image, heat in zip(rows, images, maps):
      uri = scoring.gradcam_uri(self._output, row[schemas.COLUMN_IMAGE_ID],
                                row[schemas.COLUMN_SOURCE])
      try:
        with FileSystems.create(uri) as f:
          f.write(gradcam.overlay_png(image, heat))
        row = {**row, schemas.COLUMN_GRADCAM_URI: uri}
      except Exception as e:  # pylint: disable=broad-except
        yield beam.pvalue.TaggedOutput(ERRORS, error_row(
            row[schemas.COLUMN_SOURCE], schemas.Stage.GRADCAM,
            type(e).__name__, str(e), self._run_id))
      yield row


class ReadTFRecords(beam.PTransform):
  """TFRecord paths (matched at launch) → ImageRecords; unreadable files and
  malformed records to error rows.

  Returns a dict: "images", "errors", "members_seen" (a singleton count of
  the records read plus the reader's error rows: one per bad record, skipped
  region or broken file) and "shards_unread" (a singleton count of the files
  that lost an unknown number of records).
  """

  def __init__(self, paths, run_id: str):
    super().__init__()
    self._paths = [inputs.encode(path) for path in paths]
    self._run_id = run_id

  def expand(self, pbegin):
    read = (
        pbegin
        | "Paths" >> beam.Create(self._paths)
        | "SpreadFiles" >> beam.Reshuffle()
        | "ReadRecords" >> beam.FlatMap(
            _read_tfrecord_file, self._run_id).with_outputs(
                ERRORS, UNREAD, main="records"))
    # One worker reads a whole file (a local preprocess writes one shard):
    # spreading its records lets every worker parse and score them.
    records = read.records | "SpreadRecords" >> beam.Reshuffle()
    parsed = records | "ParseExamples" >> beam.FlatMap(
        _parse_record, self._run_id).with_outputs(ERRORS, main="images")
    seen = ((read.records | "CountRecords" >> beam.combiners.Count.Globally(),
             read[ERRORS] | "CountReadErrors" >> (
                 beam.combiners.Count.Globally()))
            | "SeenParts" >> beam.Flatten()
            | "SumSeen" >> beam.CombineGlobally(sum))
    errors = (read[ERRORS], parsed[ERRORS]) | "ReadErrors" >> beam.Flatten()
    unread = read[UNREAD] | "CountUnreadShards" >> (
        beam.combiners.Count.Globally())
    return {"images": parsed.images, "errors": errors, "members_seen": seen,
            "shards_unread": unread}


class ScoreImages(beam.PTransform):
  """ImageRecords → prediction rows and error rows, via RunInference.

  Returns a dict: "rows" (prediction dicts), "errors" (error rows of images
  that got no prediction) and "gradcam_errors" (overlays that failed; their
  predictions are in "rows", so these are not member outcomes).
  """

  def __init__(self, model_dir: str, config: scoring.ScoringConfig,
               batch_size: int, accelerator=None, precision: str = "float32",
               gradcam: str = "none", output: str = "",
               model_copies: Optional[int] = None):
    super().__init__()
    self._model_copies = model_copies
    self._gradcam = gradcam
    self._output = output
    self._model_dir = model_dir
    self._config = config
    self._batch_size = batch_size
    self._accelerator = accelerator
    self._precision = precision

  def expand(self, images):
    config = self._config
    inputs = images | "ToModelInput" >> beam.FlatMap(
        _to_model_input, config).with_outputs(ERRORS, main="inputs")
    # Looked up here, not imported by name: wiring tests swap in a numpy
    # fake (tests/fakes.py) so that only the model's own tests need Keras.
    inference = RunInference(model_handler.keyed_handler(
        self._model_dir, batch_size=self._batch_size,
        precision=self._precision, model_sha256=config.model_sha256,
        model_copies=self._model_copies))
    if self._accelerator:
      inference = inference.with_resource_hints(accelerator=self._accelerator)
    results, dead = (inputs.inputs
                     | "RunInference" >> inference.with_exception_handling())

    scored = results | "ToRows" >> beam.FlatMap(
        _to_row, config, self._gradcam).with_outputs(GRADCAM, ERRORS,
                                                     main="rows")
    failed = dead.failed_inferences | "FailedBatches" >> beam.FlatMap(
        scoring.failed_batch_rows, config.run_id)
    error_parts = [inputs[ERRORS], failed, scored[ERRORS]]
    rows = scored.rows
    gradcam_errors = (images.pipeline
                      | "NoGradCamErrors" >> beam.Create([]))
    if self._gradcam != "none":
      explain = beam.ParDo(ExplainBatch(self._model_dir, self._output,
                                        config))
      if self._accelerator:
        explain = explain.with_resource_hints(accelerator=self._accelerator)
      explained = (scored[GRADCAM]
                   | "BatchForGradCam" >> beam.BatchElements(
                       min_batch_size=1, max_batch_size=self._batch_size)
                   | "GradCam" >> explain.with_outputs(ERRORS, main="rows"))
      rows = (rows, explained.rows) | "AllRows" >> beam.Flatten()
      gradcam_errors = explained[ERRORS]
    errors = tuple(error_parts) | "ScoringErrors" >> beam.Flatten()
    return {"rows": rows, "errors": errors, "gradcam_errors": gradcam_errors}


# How much of the first input `check_image_size` reads: a 224² record is
# about 150 KB before gzip.
SIZE_CHECK_BYTES = 1 << 20


def check_image_size(paths, image_size: int) -> Optional[str]:
  """`score`: the first record of the first input against the model's image
  size, at launch; a warning (logged, and returned) when it differs: the
  run would make each such image a WrongImageShape row, and a long run
  should not find that out at its end. Not a refusal: inputs of several
  sizes are allowed, each image of the wrong one an error row. Reads at
  most SIZE_CHECK_BYTES; a file whose first record is not whole there
  (damaged, not TFRecords, a record that large) is left to the run, which
  reports it."""
  if not paths:
    return None
  try:
    with FileSystems.open(paths[0], compression_type=(
        CompressionTypes.UNCOMPRESSED)) as f:
      head = f.read(SIZE_CHECK_BYTES)
    first = next(tfrecord_io.read_records(io.BytesIO(head), paths[0]), None)
    if not isinstance(first, tfrecord_io.Record):
      return None
    height, width = scoring.parse_for_scoring(first.payload).pixels.shape[:2]
  except Exception:  # pylint: disable=broad-except
    _LOG.debug("The image size was not checked at launch", exc_info=True)
    return None  # the run reads the file itself and reports what is wrong
  if (height, width) == (image_size, image_size):
    return None
  warning = (
      f"--input {archives.display_uri(paths[0])} begins with a"
      f" {height}x{width} image but the model takes {image_size}x{image_size}:"
      " every image of another size will be a WrongImageShape error row;"
      f" preprocess them again with --image_size {image_size}, or score the"
      " archives with `run`, which preprocesses at the model's size")
  _LOG.warning("%s", warning)
  return warning


def load_config(opts, run_id: str, command: str) -> scoring.ScoringConfig:
  """Loads and checks the whole artifact before any image is read.

  The model itself is loaded here too (safe mode, shapes against metadata) so
  that a corrupt, unsafe or mismatched artifact fails the launch with its
  message instead of failing every batch on the workers.
  """
  info = artifact.load_artifact(opts.model)
  for line in artifact.model_warning_lines(info.metadata):
    _LOG.warning(line)
  size = info.metadata.image_size
  if command == opts_lib.RUN and opts.image_size not in (None, size):
    raise ValueError(
        f"--image_size {opts.image_size} does not match the model's image size"
        f" {size}; leave --image_size out to use the model's")
  threshold = (opts.threshold if opts.threshold is not None else
               float(info.metadata.threshold))
  ood_threshold = None
  if info.ood is not None:
    ood_threshold = (opts.ood_threshold if opts.ood_threshold is not None
                     else info.ood.threshold)
  elif opts.ood_threshold is not None:
    raise ValueError(
        f"--ood_threshold was given but {opts.model} has no OOD detector"
        f" ({schemas.OOD_FILE}); retrain it with this version to get one")
  return scoring.ScoringConfig(
      labels=tuple(info.labels), threshold=threshold,
      model_version=info.metadata.model_version, run_id=run_id,
      image_size=size, model_sha256=info.model_sha256,
      ood_threshold=ood_threshold,
      # A flag that repeats the artifact's own value changes nothing.
      expected_flag_rates=flag_rates.expected(
          info.metadata,
          threshold_given=threshold != float(info.metadata.threshold),
          ood_threshold_given=(info.ood is not None
                               and ood_threshold != info.ood.threshold),
          has_ood=info.ood is not None),
      model_warnings=info.metadata.warnings,
      model_recalibration_warnings=info.metadata.recalibration_warnings)
