"""The SQL over a run's Parquet, written once: `summary` and the HTML report
both run these queries with DuckDB.

Queries read two views, `preds` and `errors`, which `connect` registers over
the files a run directory actually holds (DuckDB refuses a glob that matches
nothing, and a run without errors files must still be summarised).
"""

import glob
import os
from typing import NamedTuple

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
  """A DuckDB connection with the run's views, and which views exist."""
  con: duckdb.DuckDBPyConnection
  has_predictions: bool
  has_errors: bool


def connect(run_dir: str) -> Connection:
  """Registers `preds` and `errors` over the run's local Parquet files.

  The relation API rather than an f-string, so a quote in a path cannot
  break the SQL.
  """
  con = duckdb.connect()
  has_predictions = bool(glob.glob(predictions_glob(run_dir)))
  has_errors = bool(glob.glob(errors_glob(run_dir)))
  if has_predictions:
    con.read_parquet(predictions_glob(run_dir)).create_view(PREDICTIONS_VIEW)
  if has_errors:
    con.read_parquet(errors_glob(run_dir)).create_view(ERRORS_VIEW)
  return Connection(con, has_predictions, has_errors)
