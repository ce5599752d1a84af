"""`python -m beam_pipeline summary --output DIR`: a run's results as text
tables, from the queries in `reporting.sql` (DIR local or gs://)."""

import argparse
from typing import List, Optional, Sequence

import duckdb

import schemas
from busi_core import artifact, flag_rates, spelling
from reporting import run_files, sql

OOD_TOP = 10  # rows of the "Most out-of-distribution" table
STUDIES_TOP = 20  # rows of the "Studies" table


def _format(columns: Sequence[str], rows: Sequence[Sequence]) -> str:
  cells = [list(map(str, columns))] + [[_cell(v) for v in r] for r in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def _table(title: str, columns: Sequence[str], rows) -> str:
  return f"-- {title}\n{_format(columns, rows)}"


def text_table(title: str, columns: Sequence[str], rows) -> str:
  """A titled text table as the summary prints them (also
  `reporting.compare`'s)."""
  return _table(title, columns, rows)


def _cell(value) -> str:
  """A float to 3 places, no value (a share of nothing, a SQL NULL) as
  "n/a", as the tables that say why do."""
  if value is None:
    return "n/a"
  return f"{value:.3f}".rstrip("0").rstrip(".") if isinstance(
      value, float) else str(value)


def _share(part: int, whole: int) -> Optional[float]:
  return round(part / whole, 3) if whole else None


def _accuracy_rows(by_flag: Sequence[tuple]) -> List[tuple]:
  counts = {bool(low): (n, correct or 0) for low, n, correct in by_flag}
  confident, flagged = counts.get(False, (0, 0)), counts.get(True, (0, 0))
  labelled = confident[0] + flagged[0]
  return [(labelled, _share(confident[1] + flagged[1], labelled),
           _share(confident[1], confident[0]), _share(flagged[1], flagged[0]))]


def _review_rows(review: sql.ReviewCounts) -> List[tuple]:
  """needs_review and its reasons with their shares; "n/a" where the run
  recorded nothing to count (no OOD detector, no quality checks)."""
  images = review.images

  def row(name: str, count: int, recorded: bool = True) -> tuple:
    return (name, count, _share(count, images)) if recorded else (
        name, "n/a", "n/a")

  return [row("needs_review", review.needs_review),
          row("low_confidence", review.low_confidence),
          row("out_of_distribution", review.out_of_distribution,
              bool(review.ood_scored)),
          row("any_quality_flag", review.quality_flagged,
              bool(review.quality_checked))]


def _review_parts(run: sql.Connection) -> List[str]:
  """The "Needs review", "Quality flags" and "Most out-of-distribution"
  tables, or one line when the Parquet predates their columns."""
  missing = run.missing(sql.REVIEW_COLUMNS)
  if missing:
    return [f"-- Needs review: not recorded (predictions written before the"
            f" {', '.join(missing)} columns)"]
  review = sql.ReviewCounts(*run.con.execute(sql.REVIEW).fetchone())
  needs = _table("Needs review", ("reason", "images", "share"),
                 _review_rows(review))
  parts = ["\n".join([needs] + review.notes())]
  if not review.images:
    return parts
  flags = run.con.execute(sql.QUALITY_FLAG_COUNTS).fetchall()
  if not review.quality_checked:
    parts.append("-- Quality flags: none recorded")
  elif not flags:
    parts.append("-- Quality flags: none (no image has a quality flag)")
  else:
    parts.append(_table("Quality flags", ("flag", "images", "share"),
                        [(f, n, _share(n, review.images)) for f, n in flags]))
  members = run.con.execute(sql.OOD_MEMBERS, [OOD_TOP]).fetchall()
  if not review.ood_scored:
    parts.append("-- Most out-of-distribution: none recorded (the model had"
                 " no OOD detector)")
  elif not members:
    parts.append("-- Most out-of-distribution: none (no image is out of"
                 " distribution)")
  else:
    parts.append(_table(f"Most out-of-distribution (top {OOD_TOP})",
                        sql.OodMember._fields, members))
  return parts


def _study_rows(studies: sql.Studies) -> List[tuple]:
  rows = []
  for s in studies.top:
    review = f"yes ({s.review_images})" if s.needs_review else "no"
    rows.append((s.short_key, s.images, s.frames, s.series, review)
                + ((s.max_p_malignant, s.class_at_max)
                   if studies.ranked_by_malignant else ()))
  return rows


def _study_parts(run: sql.Connection) -> List[str]:
  """The "Studies" table, highest p_malignant first; one line when DICOM
  images were scored without a study key; nothing for a run with neither
  (PNG and JPEG images, or a run written before the study columns)."""
  studies = sql.query_studies(run, STUDIES_TOP)
  absent = studies.absent_note()
  if absent:
    return [f"-- {absent}"]
  if not studies.totals.studies:
    return []
  columns = ("study", "images", "frames", "series", "needs_review")
  order = "by images needing review"
  if studies.ranked_by_malignant:
    columns += (f"max_{sql.P_MALIGNANT}", "class_at_max")
    order = f"highest {sql.P_MALIGNANT} first"
  shown = len(studies.top)
  title = (f"Studies (top {shown} of {studies.totals.studies}, {order};"
           f" study = first {sql.SHORT_KEY_CHARS} hex digits of study_key)")
  lines = [_table(title, columns, _study_rows(studies))]
  if studies.more:
    lines.append(f"... and {studies.more} more.")
  return ["\n".join(lines + [studies.headline()] + studies.notes())]


def summary(output: str) -> str:
  """Runs the summary's queries and formats the results as text tables.

  Args:
    output: a run's output directory, local or gs:// (its Parquet and
      manifest are copied to a temporary directory first).

  Returns:
    The tables, after the warnings train wrote into the run's model; the
    first line says so when the run is incomplete (no manifest).

  Raises:
    run_files.RunDirError: no run there, a preprocess run (no predictions
      to summarise), or Parquet that DuckDB cannot read.
  """
  with run_files.opened(output) as files:
    if files.is_preprocess_run:
      raise run_files.RunDirError(
          f"--output {output} holds a preprocess run (TFRecords, no"
          " predictions); pass the --output of a score or run, or score it"
          f" first: score --input '{output.rstrip('/')}/"
          f"{schemas.TFRECORD_DIR}/*{schemas.TFRECORD_SUFFIX}' --model"
          " MODEL_DIR --output DIR")
    try:
      parts = _tables(sql.connect(files.local), files.manifest)
    except (duckdb.IOException, duckdb.InvalidInputException) as e:
      raise run_files.RunDirError(
          f"--output {output}: cannot read its Parquet"
          f" ({str(e).splitlines()[0]}); the files are damaged or not a"
          " run's") from e
    note = files.incomplete_note()
    warnings = _model_warning_parts(files.manifest)
  if note:
    parts.insert(0, note)
    if len(parts) == 1:
      parts.append("(no predictions or errors written yet)")
  return "\n\n".join(warnings + parts)


def _model_warning_parts(manifest: Optional[dict]) -> List[str]:
  """The warnings train and recalibrate wrote into the run's model, first:
  every figure below comes from that model."""
  return [f"WARNING: {line}"
          for line in artifact.run_warning_lines(manifest)]


def _flag_rate_parts(manifest: Optional[dict]) -> List[str]:
  """The manifest's flag-rate check (busi_core.flag_rates) as a table, and
  its warnings; nothing for runs from before the check."""
  rates = flag_rates.entries((manifest or {}).get(
      schemas.MANIFEST_FLAG_RATES))
  if not rates:
    return []
  rows = []
  for column, entry in rates.items():
    source = entry.get(schemas.FLAG_RATE_FROM)
    source = source if isinstance(source, str) else ""
    if source and entry.get(schemas.FLAG_RATE_IN_SAMPLE):
      source += " (in sample)"
    if source:
      source += "".join(f" (not {other})"
                        for other in flag_rates.passed_over(entry))
    share = entry.get(schemas.FLAG_RATE_SHARE)
    expected = flag_rates.percent(share)
    if share is None:
      why = entry.get(schemas.FLAG_RATE_WHY) or "not recorded"
      expected = f"n/a: {why}"
    flagged = entry.get(schemas.FLAG_RATE_FLAGGED)
    rows.append((column, "n/a" if flagged is None else flagged,
                 flag_rates.percent(entry.get(schemas.FLAG_RATE_OBSERVED)),
                 expected, source or "n/a",
                 flag_rates.p_text(entry.get(schemas.FLAG_RATE_P_VALUE)),
                 "RAISED" if flag_rates.is_raised(entry) else "no"))
  table = _table(
      "Flag-rate check (the run's flagged shares against the model's)",
      ("flag", "flagged", "observed", "expected", "from", "p_value",
       "raised"), rows)
  return [table] + [f"WARNING: {line}"
                    for line in flag_rates.warnings(rates)]


def _tables(run: sql.Connection, manifest: Optional[dict] = None
           ) -> List[str]:
  parts = []
  if run.has_predictions:
    rows = run.con.execute(sql.PER_CLASS).fetchall()
    parts.append(_table("Predictions per class",
                        ("predicted_class", "images", "mean_confidence"),
                        rows))
    images, flagged, thresholds = run.con.execute(sql.FLAGGED).fetchone()
    parts.append(_table(
        "Low-confidence share",
        ("images", "flagged", "flagged_share", "threshold"),
        [(images, flagged, _share(flagged, images),
          ", ".join(f"{t:g}" for t in thresholds or ()))]))
    parts += _flag_rate_parts(manifest)
    parts += _review_parts(run)
    parts += _study_parts(run)
    parts.append(_table(
        "Accuracy against known labels (all / confident / flagged)",
        ("labelled", "accuracy", "accuracy_confident", "accuracy_flagged"),
        _accuracy_rows(run.con.execute(sql.ACCURACY_BY_FLAG).fetchall())))
    parts.append(_table("Accuracy by class", ("label", "images", "recall"),
                        run.con.execute(sql.RECALL_BY_CLASS).fetchall()))
  if run.has_errors:
    parts.append(_table("Errors by stage and type",
                        ("stage", "error_type", "members", "example"),
                        run.con.execute(sql.ERRORS_BY_TYPE).fetchall()))
  return parts


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m beam_pipeline summary", description=__doc__,
      allow_abbrev=False)
  parser.add_argument("--output", required=True,
                      help="A run's output directory (local or gs://).")
  args = spelling.parse_args(parser, argv)
  print(summary(args.output))
  return 0
