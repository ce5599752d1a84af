"""The SQL over a run's Parquet, written once: `summary` and the HTML report
both run these queries with DuckDB.

Queries read two views, `preds` and `errors`, which `connect` registers over
the files a run directory actually holds (DuckDB refuses a glob that matches
nothing, and a run without errors files must still be summarised).
"""

import glob
import os
import re
from typing import Dict, FrozenSet, List, NamedTuple, Optional, Tuple

import duckdb

import schemas
from busi_core import pseudonyms

PREDICTIONS_VIEW = "preds"
ERRORS_VIEW = "errors"

# The predictions' and errors' columns, as schemas spells them.
_ID, _SOURCE, _LABEL = (schemas.COLUMN_IMAGE_ID, schemas.COLUMN_SOURCE,
                        schemas.COLUMN_LABEL)
_PREDICTED, _CONFIDENCE = (schemas.COLUMN_PREDICTED_CLASS,
                           schemas.COLUMN_CONFIDENCE)
_LOW, _THRESHOLD = schemas.COLUMN_LOW_CONFIDENCE, schemas.COLUMN_THRESHOLD
_GRADCAM = schemas.COLUMN_GRADCAM_URI
_STAGE, _ERROR_TYPE, _MESSAGE = (schemas.COLUMN_STAGE,
                                 schemas.COLUMN_ERROR_TYPE,
                                 schemas.COLUMN_MESSAGE)

PER_CLASS = (
    f"SELECT {_PREDICTED}, count(*) AS images,"
    f" avg({_CONFIDENCE}) AS mean_confidence"
    f" FROM preds GROUP BY {_PREDICTED} ORDER BY images DESC,"
    f" {_PREDICTED}")
FLAGGED = (
    "SELECT count(*) AS images,"
    f" count(*) FILTER (WHERE {_LOW}) AS flagged,"
    f" list(DISTINCT {_THRESHOLD} ORDER BY {_THRESHOLD}) AS thresholds"
    " FROM preds")
# Correct predictions among labelled images, confident and flagged apart.
ACCURACY_BY_FLAG = (
    f"SELECT {_LOW}, count(*) AS labelled,"
    f" sum(({_PREDICTED} = {_LABEL})::INT) AS correct"
    f" FROM preds WHERE {_LABEL} IS NOT NULL GROUP BY {_LOW}"
    f" ORDER BY {_LOW}")
RECALL_BY_CLASS = (
    f"SELECT {_LABEL}, count(*) AS images,"
    f" avg(({_PREDICTED} = {_LABEL})::INT) AS recall"
    f" FROM preds WHERE {_LABEL} IS NOT NULL GROUP BY {_LABEL}"
    f" ORDER BY {_LABEL}")
CONFUSION = (
    f"SELECT {_LABEL}, {_PREDICTED}, count(*) AS images FROM preds"
    f" WHERE {_LABEL} IS NOT NULL GROUP BY ALL")
ERRORS_BY_TYPE = (
    f"SELECT {_STAGE}, {_ERROR_TYPE}, count(*) AS members,"
    f" any_value({_MESSAGE}) AS example FROM errors"
    f" GROUP BY {_STAGE}, {_ERROR_TYPE}"
    f" ORDER BY members DESC, {_STAGE}, {_ERROR_TYPE}")
GRADCAM_COUNT = f"SELECT count({_GRADCAM}) FROM preds"
# Flagged and least confident first: the overlays a reviewer needs.
GALLERY = (
    f"SELECT {_SOURCE}, {_PREDICTED}, {_CONFIDENCE}, {_LOW}, {_LABEL},"
    f" {_GRADCAM} FROM preds WHERE {_GRADCAM} IS NOT NULL"
    f" ORDER BY {_LOW} DESC, {_CONFIDENCE}, {_SOURCE} LIMIT ?")

# Columns the review queries need; runs written before them have none.
REVIEW_COLUMNS = (schemas.COLUMN_OOD_SCORE, schemas.COLUMN_OUT_OF_DISTRIBUTION,
                  schemas.COLUMN_QUALITY_FLAGS, schemas.COLUMN_NEEDS_REVIEW)
# The worklist and its reasons. A null quality_flags (TFRecords from before
# the checks) or ood_score (no detector) is not counted, so `ood_scored` and
# `quality_checked` say whether the numbers mean anything.
REVIEW = (
    "SELECT count(*) AS images,"
    f" count(*) FILTER (WHERE {schemas.COLUMN_NEEDS_REVIEW}) AS needs_review,"
    f" count(*) FILTER (WHERE {schemas.COLUMN_LOW_CONFIDENCE})"
    " AS low_confidence,"
    f" count(*) FILTER (WHERE {schemas.COLUMN_OUT_OF_DISTRIBUTION})"
    " AS out_of_distribution,"
    f" count({schemas.COLUMN_OOD_SCORE}) AS ood_scored,"
    f" count({schemas.COLUMN_QUALITY_FLAGS}) AS quality_checked,"
    f" count(*) FILTER (WHERE {schemas.COLUMN_QUALITY_FLAGS} <> '')"
    " AS quality_flagged FROM preds")
# Images per quality flag: the column is comma-separated, split here so a
# run of millions of rows sends one row per flag.
QUALITY_FLAG_COUNTS = (
    "SELECT flag, count(*) AS images FROM (SELECT"
    f" trim(unnest(string_split({schemas.COLUMN_QUALITY_FLAGS}, ',')))"
    " AS flag FROM preds) WHERE flag <> '' GROUP BY flag"
    " ORDER BY images DESC, flag")
# Most out of distribution first: the images least like the training set.
OOD_MEMBERS = (
    f"SELECT {_SOURCE}, {_ID}, {_PREDICTED}, {_CONFIDENCE},"
    f" {schemas.COLUMN_OOD_SCORE} FROM preds"
    f" WHERE {schemas.COLUMN_OUT_OF_DISTRIBUTION}"
    f" ORDER BY {schemas.COLUMN_OOD_SCORE} DESC, {_SOURCE} LIMIT ?")


class ReviewCounts(NamedTuple):
  """One row of `REVIEW`: images needing review, and why."""
  images: int
  needs_review: int
  low_confidence: int
  out_of_distribution: int
  ood_scored: int  # rows with an ood_score: 0 when the model has no detector
  quality_checked: int  # rows whose quality_flags is not null
  quality_flagged: int  # rows with at least one quality flag

  def notes(self) -> List[str]:
    """What the counts cannot say, in words (summary and report alike)."""
    notes = []
    if not self.images:
      return notes
    if not self.ood_scored:
      notes.append("The model had no OOD detector: ood_score is null in every"
                   " row, so nothing is flagged out of distribution.")
    elif self.ood_scored < self.images:
      notes.append(f"OOD scores recorded for {self.ood_scored} of"
                   f" {self.images} images.")
    if not self.quality_checked:
      notes.append("No quality checks recorded: quality_flags is null in"
                   " every row (TFRecords written before the checks).")
    elif self.quality_checked < self.images:
      notes.append(f"Quality checks recorded for {self.quality_checked} of"
                   f" {self.images} images.")
    return notes


class FlagCount(NamedTuple):
  """One row of `QUALITY_FLAG_COUNTS`."""
  flag: str
  images: int


class OodMember(NamedTuple):
  """One row of `OOD_MEMBERS`."""
  source: str
  image_id: str
  predicted_class: str
  confidence: float
  ood_score: float


def confidence_histogram(bins: int) -> str:
  """Counts per confidence bin, binned in SQL: a run of millions of rows
  sends `bins` numbers, not every row."""
  return (f"SELECT least(floor({_CONFIDENCE} * {bins})::INT, {bins - 1})"
          " AS bin, count(*) FROM preds GROUP BY bin")


def predictions_glob(output: str) -> str:
  return os.path.join(output, schemas.PREDICTIONS_DIR, "*.parquet")


def errors_glob(output: str) -> str:
  return os.path.join(output, schemas.ERRORS_DIR, "*.parquet")


class Connection(NamedTuple):
  """A DuckDB connection with the run's views, which views exist, and the
  columns of `preds` (runs written by older versions lack some)."""
  con: duckdb.DuckDBPyConnection
  has_predictions: bool
  has_errors: bool
  columns: FrozenSet[str] = frozenset()

  def missing(self, columns: Tuple[str, ...]) -> Tuple[str, ...]:
    """Those of `columns` that `preds` lacks (all when there is no view)."""
    return tuple(c for c in columns if c not in self.columns)


def connect(run_dir: str) -> Connection:
  """Registers `preds` and `errors` over the run's local Parquet files.

  The relation API rather than an f-string, so a quote in a path cannot
  break the SQL.
  """
  con = duckdb.connect()
  has_predictions = bool(glob.glob(predictions_glob(run_dir)))
  has_errors = bool(glob.glob(errors_glob(run_dir)))
  columns = frozenset()
  if has_predictions:
    preds = con.read_parquet(predictions_glob(run_dir))
    preds.create_view(PREDICTIONS_VIEW)
    columns = frozenset(preds.columns)
  if has_errors:
    con.read_parquet(errors_glob(run_dir)).create_view(ERRORS_VIEW)
  return Connection(con, has_predictions, has_errors, columns)


# --------------------------------------------------------------------------
# Studies: rows grouped by study_key (DICOM scored with an HMAC key)

# The class whose probability ranks studies; a model without it ranks them
# by their images needing review instead (`Studies.ranked_by_malignant`).
MALIGNANT = schemas.MALIGNANT
P_MALIGNANT = schemas.probability_column(MALIGNANT)
# Columns the study queries read. A run written before one of them reads it
# as a typed NULL: an old run then has no studies and no DICOM rows, and the
# same two queries still run.
_STUDY_SQL_COLUMNS = {
    schemas.COLUMN_STUDY_KEY: "VARCHAR",
    schemas.COLUMN_SERIES_KEY: "VARCHAR",
    schemas.COLUMN_FRAME: "BIGINT",
    schemas.COLUMN_REGION_CROPPED: "BOOLEAN",
    schemas.COLUMN_NEEDS_REVIEW: "BOOLEAN",
    P_MALIGNANT: "DOUBLE",
}
# What a key must look like to be shown (an HMAC-SHA256 hex digest, as the
# record codec enforces); anything else might be a raw UID and is never
# printed, not even in part.
_KEY_PATTERN = re.compile(r"[0-9a-f]{64}")
SHORT_KEY_CHARS = 12
INVALID_KEY = "(not a key)"


def _study_columns(columns: FrozenSet[str]) -> Dict[str, str]:
  """Each study column as SQL: its name, or a typed NULL when missing."""
  return {name: name if name in columns else f"CAST(NULL AS {sql_type})"
          for name, sql_type in _STUDY_SQL_COLUMNS.items()}


def study_totals_sql(columns: FrozenSet[str]) -> str:
  """One row (`StudyTotals`) over the whole run. A DICOM row is one with a
  frame number (multi-frame) or a region_cropped value (set for every
  DICOM, cropped or not); PNG and JPEG rows have neither."""
  c = _study_columns(columns)
  key = c[schemas.COLUMN_STUDY_KEY]
  return (
      f"SELECT count(*) AS images, count({key}) AS keyed_images,"
      f" count(DISTINCT {key}) AS studies,"
      f" count(DISTINCT {key}) FILTER (WHERE"
      f" {c[schemas.COLUMN_NEEDS_REVIEW]}) AS studies_needing_review,"
      f" count(*) FILTER (WHERE {c[schemas.COLUMN_FRAME]} IS NOT NULL"
      f" OR {c[schemas.COLUMN_REGION_CROPPED]} IS NOT NULL) AS dicom_images"
      " FROM preds")


def studies_sql(columns: FrozenSet[str]) -> str:
  """Rows of `StudyRow`, highest p_malignant first (ties: more images
  needing review, more images, then the key), at most `?` of them.

  Without a p_malignant column max_p_malignant and class_at_max are null
  and the order starts at the images needing review. class_at_max is the
  predicted class of the study's image with the highest p_malignant (ties
  broken by image_id, so the answer is the same on every run).
  """
  c = _study_columns(columns)
  key, p = c[schemas.COLUMN_STUDY_KEY], c[P_MALIGNANT]
  return (
      f"SELECT {key} AS study_key, count(*) AS images,"
      f" count(DISTINCT {c[schemas.COLUMN_SERIES_KEY]}) AS series,"
      f" count({c[schemas.COLUMN_FRAME]}) AS frames,"
      f" count(*) FILTER (WHERE {c[schemas.COLUMN_NEEDS_REVIEW]})"
      " AS review_images,"
      f" max({p}) AS max_p_malignant,"
      f" first({_PREDICTED} ORDER BY {p} DESC NULLS LAST, {_ID})"
      " AS class_at_max"
      f" FROM preds WHERE {key} IS NOT NULL GROUP BY {key}"
      " ORDER BY max_p_malignant DESC NULLS LAST, review_images DESC,"
      " images DESC, study_key LIMIT ?")


def short_key(key: Optional[str]) -> str:
  """The first SHORT_KEY_CHARS hex digits of a study key, enough to tell
  studies apart and to find one (`study_key LIKE 'abc…%'`); INVALID_KEY for
  a value that is not an HMAC-SHA256 hex digest."""
  if key is None or not _KEY_PATTERN.fullmatch(key):
    return INVALID_KEY
  return key[:SHORT_KEY_CHARS]


def shown_key(key: Optional[str]) -> Optional[str]:
  """The whole key when it is one (for a title attribute), else None."""
  return key if key is not None and _KEY_PATTERN.fullmatch(key) else None


class StudyTotals(NamedTuple):
  """One row of `study_totals_sql`."""
  images: int
  keyed_images: int  # rows whose study_key is not null
  studies: int
  studies_needing_review: int  # studies with at least one such image
  dicom_images: int  # rows with a frame or region_cropped value


class StudyRow(NamedTuple):
  """One row of `studies_sql`: one study."""
  study_key: str
  images: int  # prediction rows: images, or frames of multi-frame DICOMs
  series: int  # distinct series_key values
  frames: int  # rows with a frame number (of a multi-frame DICOM)
  review_images: int  # rows with needs_review
  max_p_malignant: Optional[float]  # None when the model has no such class
  class_at_max: Optional[str]

  @property
  def needs_review(self) -> bool:
    return self.review_images > 0

  @property
  def short_key(self) -> str:
    return short_key(self.study_key)


class Studies(NamedTuple):
  """The run's studies: totals, the first `len(top)` by rank, and words
  for both (summary and report alike)."""
  totals: StudyTotals
  top: Tuple[StudyRow, ...]
  ranked_by_malignant: bool

  @property
  def more(self) -> int:
    """Studies ranked below those in `top`."""
    return self.totals.studies - len(self.top)

  def headline(self) -> str:
    t = self.totals
    return (f"{t.studies} {'study' if t.studies == 1 else 'studies'},"
            f" {t.studies_needing_review} with an image needing review"
            f" ({t.keyed_images} of {t.images} images carry a study_key).")

  def notes(self) -> List[str]:
    """What the totals cannot say, in words."""
    notes = []
    t = self.totals
    if t.keyed_images < t.images:
      notes.append(f"{t.images - t.keyed_images} images without a study_key"
                   " (not DICOM, no Study Instance UID, or scored without"
                   " a key) are in no study.")
    if not self.ranked_by_malignant:
      notes.append(f"The model has no {MALIGNANT} class: studies are ranked"
                   " by images needing review, then by images.")
    return notes

  def absent_note(self) -> Optional[str]:
    """The one line said when no row has a study_key: None for a run with
    no DICOM images (nothing to group), else why nothing is grouped."""
    t = self.totals
    if t.studies or not t.dicom_images:
      return None
    return (f"Studies: not grouped: study_key is null in every row, though"
            f" {t.dicom_images} of {t.images} images are DICOM (score with"
            f" --study_hmac_key or ${pseudonyms.KEY_ENV} to group them"
            " by study).")


def query_studies(run: Connection, limit: int) -> Optional[Studies]:
  """The run's studies, the first `limit` of them by rank; None without
  predictions."""
  if not run.has_predictions:
    return None
  totals = StudyTotals(*run.con.execute(
      study_totals_sql(run.columns)).fetchone())
  top = ()
  if totals.studies:
    top = tuple(StudyRow(*r) for r in run.con.execute(
        studies_sql(run.columns), [limit]).fetchall())
  return Studies(totals, top, P_MALIGNANT in run.columns)
