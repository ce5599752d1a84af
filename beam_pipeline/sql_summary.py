"""SQL over a run's Parquet with DuckDB: the queries the README shows.

`python -m beam_pipeline summary --output DIR` prints them for one run.
"""

import argparse
import os
from typing import List, Sequence, Tuple

import schemas


def predictions_glob(output: str) -> str:
  return os.path.join(output, schemas.PREDICTIONS_DIR, "*.parquet")


def errors_glob(output: str) -> str:
  return os.path.join(output, schemas.ERRORS_DIR, "*.parquet")


def queries(output: str) -> List[Tuple[str, str]]:
  """(title, SQL) pairs over one run's outputs."""
  preds = f"read_parquet('{predictions_glob(output)}')"
  errors = f"read_parquet('{errors_glob(output)}')"
  return [
      ("Predictions per class",
       f"SELECT predicted_class, count(*) AS images,"
       f" round(avg(confidence), 3) AS mean_confidence"
       f" FROM {preds} GROUP BY predicted_class ORDER BY images DESC"),
      ("Low-confidence share",
       f"SELECT count(*) AS images,"
       f" count(*) FILTER (WHERE low_confidence) AS flagged,"
       f" round(100.0 * count(*) FILTER (WHERE low_confidence)"
       f" / nullif(count(*), 0), 1) AS flagged_pct,"
       f" round(any_value(threshold), 4) AS threshold FROM {preds}"),
      ("Accuracy against known labels (all / confident / flagged)",
       f"SELECT count(*) AS labelled,"
       f" round(avg((predicted_class = label)::INT), 3) AS accuracy,"
       f" round(avg((predicted_class = label)::INT) FILTER"
       f" (WHERE NOT low_confidence), 3) AS accuracy_confident,"
       f" round(avg((predicted_class = label)::INT) FILTER"
       f" (WHERE low_confidence), 3) AS accuracy_flagged"
       f" FROM {preds} WHERE label IS NOT NULL"),
      ("Accuracy by class",
       f"SELECT label, count(*) AS images,"
       f" round(avg((predicted_class = label)::INT), 3) AS recall"
       f" FROM {preds} WHERE label IS NOT NULL GROUP BY label ORDER BY label"),
      ("Errors by stage and type",
       f"SELECT stage, error_type, count(*) AS members FROM {errors}"
       f" GROUP BY ALL ORDER BY members DESC"),
  ]


def _format(columns: Sequence[str], rows: Sequence[tuple]) -> str:
  cells = [list(map(str, columns))] + [[str(v) for v in r] for r in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def summary(output: str) -> str:
  """Runs every query and formats the results as text tables."""
  import duckdb  # pylint: disable=import-outside-toplevel
  con = duckdb.connect()
  parts = []
  for title, query in queries(output):
    cur = con.execute(query)
    columns = [d[0] for d in cur.description]
    parts.append(f"-- {title}\n{_format(columns, cur.fetchall())}")
  return "\n\n".join(parts)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m beam_pipeline summary", description=__doc__)
  parser.add_argument("--output", required=True,
                      help="A run's output directory (local).")
  args = parser.parse_args(argv)
  print(summary(args.output))
  return 0
