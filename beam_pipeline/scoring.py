"""Per-element scoring functions: Example → model input, result → Parquet row."""

import datetime
import functools
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

import schemas
from beam_pipeline.errors import error_row
from busi_core import inference
from schemas import records


class RowKey(NamedTuple):
  """RunInference key: the image_id, with what the output row needs besides."""
  image_id: str
  source: str
  label: str
  quality_flags: Optional[str] = None  # as the record has them
  # DICOM fields as the record has them (None for other images).
  frame: Optional[int] = None
  study_key: Optional[str] = None
  series_key: Optional[str] = None
  region_cropped: Optional[bool] = None


@functools.lru_cache(maxsize=8)
def prediction_columns(labels: Tuple[str, ...]) -> Tuple[str, ...]:
  """The predictions table's column names (from schemas), cached per label
  set since every row needs them."""
  return tuple(schemas.prediction_columns(labels))


class ScoringConfig(NamedTuple):
  """Everything a prediction row needs besides the model output."""
  labels: Tuple[str, ...]
  threshold: float
  model_version: str
  run_id: str
  image_size: int
  # sha256 of the model.keras the job was launched with: workers refuse to
  # score with any other (the rows carry this model's model_version).
  # None: not checked.
  model_sha256: Optional[str] = None
  # Scores above it are out of distribution (the artifact's, or
  # --ood_threshold); None: the artifact has no OOD detector.
  ood_threshold: Optional[float] = None
  # The artifact's held-out flagged shares (busi_core.flag_rates.expected),
  # which the manifest's check compares the run's with; None: no check.
  expected_flag_rates: Optional[Dict] = None
  # The artifact's metadata `warnings` (what train found wrong with it);
  # None: the artifact predates train's checks.
  model_warnings: Optional[Tuple[str, ...]] = None
  # Its metadata `recalibration` → `warnings` (what recalibrate found on the
  # site sample); None: not recalibrated, or recalibrated before the check.
  model_recalibration_warnings: Optional[Tuple[str, ...]] = None


def keyed_input(record: records.ImageRecord, image_size: int
               ) -> Tuple[RowKey, np.ndarray]:
  """ImageRecord → (key, uint8 pixels) for the keyed model handler.

  Raises:
    ValueError: the pixels are not image_size × image_size × 3 uint8, which
      would fail the whole batch inside the model.
  """
  pixels = record.pixels
  if pixels.dtype != np.uint8 or pixels.shape != (image_size, image_size, 3):
    raise ValueError(
        f"image is {pixels.dtype} {tuple(pixels.shape)}, the model takes uint8"
        f" ({image_size}, {image_size}, 3); preprocess with --image_size"
        f" {image_size}")
  return RowKey(record.image_id, record.source, record.label or "",
                record.quality_flags, record.frame, record.study_key,
                record.series_key, record.region_cropped), pixels


def prediction_row(key: RowKey, output: inference.ModelOutput,
                   config: ScoringConfig,
                   scored_at: Optional[datetime.datetime] = None,
                   gradcam_uri: Optional[str] = None) -> Dict:
  """One predictions row, columns as in `schemas.predictions_schema`.

  `out_of_distribution` is null when either the score or the threshold is
  (an artifact without a detector); `needs_review` is true when the image is
  low-confidence, out of distribution or has any quality flag.
  """
  probs = [float(p) for p in output.probabilities]
  if len(probs) != len(config.labels):
    raise ValueError(f"model returned {len(probs)} probabilities for"
                     f" {len(config.labels)} labels")
  top = int(np.argmax(probs))
  confidence = probs[top]
  low_confidence = confidence < config.threshold
  ood_score = None if output.ood_score is None else float(output.ood_score)
  out_of_distribution = (None if ood_score is None or
                         config.ood_threshold is None else
                         ood_score > config.ood_threshold)
  needs_review = bool(low_confidence or out_of_distribution or
                      key.quality_flags)
  values = [key.image_id, key.source, key.label or None, config.labels[top]]
  values += probs
  values += [confidence, low_confidence,
             float(config.threshold), config.model_version, config.run_id,
             scored_at or datetime.datetime.now(datetime.timezone.utc),
             gradcam_uri, ood_score, out_of_distribution, key.quality_flags,
             needs_review, key.frame, key.study_key, key.series_key,
             key.region_cropped]
  return dict(zip(prediction_columns(config.labels), values, strict=True))


def failed_batch_rows(failure, run_id: str) -> List[Dict]:
  """RunInference dead letter → one error row per image of the batch.

  Beam hands over (batch, (exception type, repr, traceback)); a plain
  exception in second place is accepted too.
  """
  batch, exception = failure
  if isinstance(exception, tuple) and exception and isinstance(
      exception[0], type):
    error_type = exception[0].__name__
    message = str(exception[1]) if len(exception) > 1 else error_type
  else:
    error_type = type(exception).__name__
    message = f"{error_type}: {exception}"
  rows = []
  for element in batch:
    key = element[0] if isinstance(element, tuple) else None
    source = key.source if isinstance(key, RowKey) else repr(key)
    rows.append(error_row(source, schemas.Stage.INFERENCE, error_type,
                          message[:2000], run_id))
  return rows


def parse_for_scoring(serialized: bytes) -> records.ImageRecord:
  """A TFRecord payload → ImageRecord (raises ValueError when malformed)."""
  return records.from_example(serialized)


def wants_gradcam(row: Dict, mode: str) -> bool:
  """Whether `--gradcam MODE` asks for an overlay of this prediction."""
  if mode == "all":
    return True
  if mode == "flagged":
    return bool(row[schemas.COLUMN_LOW_CONFIDENCE])
  if mode == "malignant":
    return row[schemas.COLUMN_PREDICTED_CLASS] == schemas.MALIGNANT
  return False


def gradcam_uri(output: str, image_id: str, source: str) -> str:
  """Where one overlay goes: named by content and source, never by a member
  name, so no archive path can steer where we write."""
  import hashlib  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel
  base = output if "://" in output else os.path.abspath(output)
  tag = hashlib.sha256(source.encode("utf-8")).hexdigest()[:12]
  return FileSystems.join(base, schemas.GRADCAM_DIR,
                          f"{image_id[:32]}-{tag}.png")


def is_low_confidence(row: Dict) -> bool:
  return row[schemas.COLUMN_LOW_CONFIDENCE]


def is_out_of_distribution(row: Dict) -> bool:
  return bool(row[schemas.COLUMN_OUT_OF_DISTRIBUTION])


def needs_review(row: Dict) -> bool:
  return row[schemas.COLUMN_NEEDS_REVIEW]


def quality_flag_names(row: Dict) -> List[str]:
  """The row's quality flags as a list (none for "" or null)."""
  value = row[schemas.COLUMN_QUALITY_FLAGS] or ""
  return [name for name in value.split(schemas.QUALITY_FLAG_SEPARATOR)
          if name]


def predicted_class(row: Dict) -> str:
  return row[schemas.COLUMN_PREDICTED_CLASS]
