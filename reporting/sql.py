"""The SQL over a run's Parquet, written once: `summary` and the HTML report
both run these queries with DuckDB.

Queries read two views, `preds` and `errors`, which `connect` registers over
the files a run directory actually holds (DuckDB refuses a glob that matches
nothing, and a run without errors files must still be summarised).
"""

import glob
import os
from typing import FrozenSet, List, NamedTuple, Tuple

import duckdb

import schemas

PREDICTIONS_VIEW = "preds"
ERRORS_VIEW = "errors"

PER_CLASS = (
    "SELECT predicted_class, count(*) AS images,"
    " avg(confidence) AS mean_confidence"
    " FROM preds GROUP BY predicted_class ORDER BY images DESC,"
    " predicted_class")
FLAGGED = (
    "SELECT count(*) AS images,"
    " count(*) FILTER (WHERE low_confidence) AS flagged,"
    " list(DISTINCT threshold ORDER BY threshold) AS thresholds FROM preds")
# Correct predictions among labelled images, confident and flagged apart.
ACCURACY_BY_FLAG = (
    "SELECT low_confidence, count(*) AS labelled,"
    " sum((predicted_class = label)::INT) AS correct"
    " FROM preds WHERE label IS NOT NULL GROUP BY low_confidence"
    " ORDER BY low_confidence")
RECALL_BY_CLASS = (
    "SELECT label, count(*) AS images,"
    " avg((predicted_class = label)::INT) AS recall"
    " FROM preds WHERE label IS NOT NULL GROUP BY label ORDER BY label")
CONFUSION = (
    "SELECT label, predicted_class, count(*) AS images FROM preds"
    " WHERE label IS NOT NULL GROUP BY ALL")
ERRORS_BY_TYPE = (
    "SELECT stage, error_type, count(*) AS members,"
    " any_value(message) AS example FROM errors GROUP BY stage, error_type"
    " ORDER BY members DESC, stage, error_type")
GRADCAM_COUNT = "SELECT count(gradcam_uri) FROM preds"
# Flagged and least confident first: the overlays a reviewer needs.
GALLERY = (
    "SELECT source, predicted_class, confidence, low_confidence, label,"
    " gradcam_uri FROM preds WHERE gradcam_uri IS NOT NULL"
    " ORDER BY low_confidence DESC, confidence, source LIMIT ?")

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
    "SELECT source, image_id, predicted_class, confidence,"
    f" {schemas.COLUMN_OOD_SCORE} FROM preds"
    f" WHERE {schemas.COLUMN_OUT_OF_DISTRIBUTION}"
    f" ORDER BY {schemas.COLUMN_OOD_SCORE} DESC, source LIMIT ?")


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
  return (f"SELECT least(floor(confidence * {bins})::INT, {bins - 1})"
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
