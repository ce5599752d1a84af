"""`python -m beam_pipeline summary --output DIR`: a run's results as text
tables, from the queries in `reporting.sql`."""

import argparse
from typing import List, Optional, Sequence

from reporting import sql


def _format(columns: Sequence[str], rows: Sequence[Sequence]) -> str:
  cells = [list(map(str, columns))] + [[_cell(v) for v in r] for r in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def _cell(value) -> str:
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


def summary(output: str) -> str:
  """Runs the summary's queries and formats the results as text tables."""
  run = sql.connect(output)
  parts = []

  def table(title: str, columns: Sequence[str], rows) -> None:
    parts.append(f"-- {title}\n{_format(columns, rows)}")

  if run.has_predictions:
    rows = run.con.execute(sql.PER_CLASS).fetchall()
    table("Predictions per class",
          ("predicted_class", "images", "mean_confidence"), rows)
    images, flagged, thresholds = run.con.execute(sql.FLAGGED).fetchone()
    table("Low-confidence share",
          ("images", "flagged", "flagged_share", "threshold"),
          [(images, flagged, _share(flagged, images),
            ", ".join(f"{t:g}" for t in thresholds or ()))])
    table("Accuracy against known labels (all / confident / flagged)",
          ("labelled", "accuracy", "accuracy_confident", "accuracy_flagged"),
          _accuracy_rows(run.con.execute(sql.ACCURACY_BY_FLAG).fetchall()))
    table("Accuracy by class", ("label", "images", "recall"),
          run.con.execute(sql.RECALL_BY_CLASS).fetchall())
  if run.has_errors:
    table("Errors by stage and type",
          ("stage", "error_type", "members", "example"),
          run.con.execute(sql.ERRORS_BY_TYPE).fetchall())
  return "\n\n".join(parts)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m beam_pipeline summary", description=__doc__,
      allow_abbrev=False)
  parser.add_argument("--output", required=True,
                      help="A run's output directory (local).")
  args = parser.parse_args(argv)
  print(summary(args.output))
  return 0
