"""Parquet schemas of the predictions and errors outputs.

Only signed integers, doubles, strings, booleans and a UTC timestamp are used,
so BigQuery external tables and DuckDB read the files without options.
"""

import enum
from typing import List, Sequence

import pyarrow as pa


class Stage(str, enum.Enum):
  """Where in the pipeline a failure happened (the errors' `stage` column)."""
  READ = "read"  # opening or listing an archive
  EXTRACT = "extract"  # reading one member's bytes
  DECODE = "decode"  # turning bytes into pixels
  PARSE = "parse"  # reading a TFRecord example back
  INFERENCE = "inference"
  GRADCAM = "gradcam"


# Columns of the predictions table that code reads or writes by name (the
# errors table shares source and run_id).
COLUMN_IMAGE_ID = "image_id"  # sha256 hex of the member's bytes
COLUMN_SOURCE = "source"  # the archive member's URI (errors: what failed)
COLUMN_LABEL = "label"  # the class its path names (scoring: null if none)
COLUMN_PREDICTED_CLASS = "predicted_class"
COLUMN_CONFIDENCE = "confidence"  # the top class's calibrated probability
COLUMN_THRESHOLD = "threshold"  # below it: low_confidence
COLUMN_MODEL_VERSION = "model_version"
COLUMN_RUN_ID = "run_id"
COLUMN_SCORED_AT = "scored_at"
COLUMN_GRADCAM_URI = "gradcam_uri"
COLUMN_LOW_CONFIDENCE = "low_confidence"
COLUMN_OOD_SCORE = "ood_score"  # null: the model has no OOD detector
COLUMN_OUT_OF_DISTRIBUTION = "out_of_distribution"  # null: as ood_score
# Comma-separated quality flag names (schemas.QUALITY_FLAGS), "" when none;
# null when the TFRecord predates the checks.
COLUMN_QUALITY_FLAGS = "quality_flags"
# low_confidence, out_of_distribution or any quality flag: the one column a
# review worklist filters on.
COLUMN_NEEDS_REVIEW = "needs_review"
# DICOM columns, null for other images (schemas.features has their meaning):
COLUMN_FRAME = "frame"  # 1-based frame of a multi-frame DICOM
COLUMN_STUDY_KEY = "study_key"  # keyed hash of StudyInstanceUID
COLUMN_SERIES_KEY = "series_key"  # keyed hash of SeriesInstanceUID
COLUMN_REGION_CROPPED = "region_cropped"  # cropped to the US B-mode region
# Columns the out-of-fold predictions (cv_predictions_schema) add.
COLUMN_FOLD = "fold"
COLUMN_TEMPERATURE = "temperature"
# ... and with `cv --masks`: Grad-CAM of the true class against the image's
# lesion masks (schemas.evaluation), null for normal images and for those
# without a usable mask.
COLUMN_LESION_POINTING_HIT = "lesion_pointing_hit"  # peak in the lesion
COLUMN_LESION_IOU = "lesion_iou"  # of {heatmap >= 0.5 of its peak}, lesion
# Columns the evaluation predictions (evaluation_predictions_schema) add.
# The image is in the artifact's training or validation split (the same
# image_id); null when the artifact has no split.json.
COLUMN_SEEN_IN_TRAINING = "seen_in_training"
# Not itself there, but a near-duplicate of an image there (dHash within
# training.split.DEFAULT_MAX_DISTANCE bits; false for the images above);
# null also when the split.json predates the dHashes.
COLUMN_NEAR_DUPLICATE_OF_TRAINING = "near_duplicate_of_training"
# The image, or a near-duplicate of it, is in the part of a site sample that
# `recalibrate` fitted this artifact's temperature and chose its threshold on
# (its recalibration_split.json): calibration and flagging figures on it are
# in-sample. False for every image when the artifact was never recalibrated;
# null when it was but that file is missing or is not its own.
COLUMN_IN_RECALIBRATION_FIT = "in_recalibration_fit"
# The errors table's own columns (it shares source and run_id).
COLUMN_STAGE = "stage"  # a Stage
COLUMN_ERROR_TYPE = "error_type"
COLUMN_MESSAGE = "message"


def errors_schema() -> pa.Schema:
  """Schema of `DIR/errors/*.parquet`."""
  return pa.schema([
      pa.field(COLUMN_SOURCE, pa.string(), nullable=False),
      pa.field(COLUMN_STAGE, pa.string(), nullable=False),
      pa.field(COLUMN_ERROR_TYPE, pa.string(), nullable=False),
      pa.field(COLUMN_MESSAGE, pa.string(), nullable=False),
      pa.field(COLUMN_RUN_ID, pa.string(), nullable=False),
  ])


def error_columns():
  """Column names of the errors table, in order."""
  return [f.name for f in errors_schema()]


def probability_column(label: str) -> str:
  """Name of the probability column of one class, e.g. `p_benign`."""
  return f"p_{label}"


def prediction_columns(labels: Sequence[str]) -> List[str]:
  """Column names of the predictions table, in their fixed order."""
  return [f.name for f in predictions_schema(labels)]


def predictions_schema(labels: Sequence[str]) -> pa.Schema:
  """Schema of `DIR/predictions/*.parquet` for a model with these labels.

  Args:
    labels: class names in the model's output order (its labels.json).

  Returns:
    The Arrow schema, columns in the documented order.
  """
  fields = [
      pa.field(COLUMN_IMAGE_ID, pa.string(), nullable=False),
      pa.field(COLUMN_SOURCE, pa.string(), nullable=False),
      pa.field(COLUMN_LABEL, pa.string(), nullable=True),
      pa.field(COLUMN_PREDICTED_CLASS, pa.string(), nullable=False),
  ]
  fields += [
      pa.field(probability_column(label), pa.float64(), nullable=False)
      for label in labels
  ]
  fields += [
      pa.field(COLUMN_CONFIDENCE, pa.float64(), nullable=False),
      pa.field(COLUMN_LOW_CONFIDENCE, pa.bool_(), nullable=False),
      pa.field(COLUMN_THRESHOLD, pa.float64(), nullable=False),
      pa.field(COLUMN_MODEL_VERSION, pa.string(), nullable=False),
      pa.field(COLUMN_RUN_ID, pa.string(), nullable=False),
      pa.field(COLUMN_SCORED_AT, pa.timestamp("us", tz="UTC"), nullable=False),
      pa.field(COLUMN_GRADCAM_URI, pa.string(), nullable=True),
      pa.field(COLUMN_OOD_SCORE, pa.float64(), nullable=True),
      pa.field(COLUMN_OUT_OF_DISTRIBUTION, pa.bool_(), nullable=True),
      pa.field(COLUMN_QUALITY_FLAGS, pa.string(), nullable=True),
      pa.field(COLUMN_NEEDS_REVIEW, pa.bool_(), nullable=False),
      pa.field(COLUMN_FRAME, pa.int64(), nullable=True),
      pa.field(COLUMN_STUDY_KEY, pa.string(), nullable=True),
      pa.field(COLUMN_SERIES_KEY, pa.string(), nullable=True),
      pa.field(COLUMN_REGION_CROPPED, pa.bool_(), nullable=True),
  ]
  return pa.schema(fields)


def cv_predictions_schema(labels: Sequence[str],
                          localised: bool = False) -> pa.Schema:
  """Schema of `cv`'s out-of-fold predictions (CV_PREDICTIONS_FILE).

  One row per image: the fold it was held out in, its label, and what the
  model trained on the other folds made of it, calibrated with that fold's
  temperature and flagged at that fold's threshold. The names the scoring
  table shares with it mean the same. `out_of_distribution` is null when
  the recipe fits no OOD detector. `localised` (`cv --masks`): the two
  lesion columns follow.
  """
  scored = predictions_schema(labels)
  fields = [scored.field(COLUMN_IMAGE_ID),
            pa.field(COLUMN_FOLD, pa.int64(), nullable=False),
            pa.field(COLUMN_LABEL, pa.string(), nullable=False),
            scored.field(COLUMN_PREDICTED_CLASS)]
  fields += [scored.field(probability_column(label)) for label in labels]
  fields += [scored.field(COLUMN_CONFIDENCE),
             pa.field(COLUMN_TEMPERATURE, pa.float64(), nullable=False),
             scored.field(COLUMN_THRESHOLD),
             scored.field(COLUMN_LOW_CONFIDENCE),
             scored.field(COLUMN_OUT_OF_DISTRIBUTION)]
  if localised:
    fields += _lesion_fields()
  return pa.schema(fields)


def _lesion_fields() -> List[pa.Field]:
  return [pa.field(COLUMN_LESION_POINTING_HIT, pa.bool_()),
          pa.field(COLUMN_LESION_IOU, pa.float64())]


def evaluation_predictions_schema(labels: Sequence[str],
                                  localised: bool = False) -> pa.Schema:
  """Schema of `evaluate`'s per-image predictions (schemas.evaluation
  PREDICTIONS_FILE, beside metrics.json).

  One row per evaluated image: its label and what the artifact made of it,
  exactly as scoring would (calibrated probabilities, the artifact's
  threshold and OOD detector), and whether the artifact (or its
  recalibration) was fitted on it.
  The names the scoring table shares with it mean the same.
  `out_of_distribution` and `ood_score` are null when the artifact has no OOD
  detector. `localised` (`evaluate --masks`): the two lesion columns follow.
  """
  scored = predictions_schema(labels)
  fields = [scored.field(COLUMN_IMAGE_ID), scored.field(COLUMN_SOURCE),
            pa.field(COLUMN_LABEL, pa.string(), nullable=False),
            scored.field(COLUMN_PREDICTED_CLASS)]
  fields += [scored.field(probability_column(label)) for label in labels]
  fields += [scored.field(name) for name in (
      COLUMN_CONFIDENCE, COLUMN_THRESHOLD, COLUMN_LOW_CONFIDENCE,
      COLUMN_OOD_SCORE, COLUMN_OUT_OF_DISTRIBUTION, COLUMN_MODEL_VERSION)]
  fields += [pa.field(COLUMN_SEEN_IN_TRAINING, pa.bool_()),
             pa.field(COLUMN_NEAR_DUPLICATE_OF_TRAINING, pa.bool_()),
             pa.field(COLUMN_IN_RECALIBRATION_FIT, pa.bool_())]
  if localised:
    fields += _lesion_fields()
  return pa.schema(fields)
