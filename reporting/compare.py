"""`python -m beam_pipeline compare --old RUN --new RUN --output DIR`: how two
scored runs (usually of two model versions) agree, joined on image_id.

DuckDB SQL over the two runs' predictions Parquet (a gs:// run is copied
first through Beam's FileSystems, `reporting.run_files`): images in both /
only old / only new, the old → new predicted-class table, the distribution
of confidence changes, and images newly flagged or unflagged. Printed as
text tables and written as `DIR/comparison.json` and a self-contained
`DIR/comparison.html`.

An image that appears twice in one run (the same bytes under two names) is
counted once: its rows agree, being the same pixels through the same model.
"""

import argparse
import contextlib
import dataclasses
import json
import os
from typing import Iterator, List, Optional, Sequence, Tuple

import duckdb
from apache_beam.io.filesystems import FileSystems

import schemas
from busi_core import artifact, gcs, output_dirs, spelling
from reporting import report, run_files, sql, summary

JSON_FILE = "comparison.json"
HTML_FILE = "comparison.html"
# Confidence change (new − old) is binned in BIN_WIDTH steps over [-1, 1].
BIN_WIDTH = 0.1
_BINS = round(2 / BIN_WIDTH)
DEFAULT_EXAMPLES = 20
# The flags whose false → true (and back) the comparison counts.
FLAGS = (schemas.COLUMN_LOW_CONFIDENCE, schemas.COLUMN_NEEDS_REVIEW,
         schemas.COLUMN_OUT_OF_DISTRIBUTION)
_OLD, _NEW = "old", "new"  # the views of the two runs' predictions
# The predictions' columns the queries read, as schemas spells them.
_ID, _SOURCE = schemas.COLUMN_IMAGE_ID, schemas.COLUMN_SOURCE
_PREDICTED, _CONFIDENCE = (schemas.COLUMN_PREDICTED_CLASS,
                           schemas.COLUMN_CONFIDENCE)
_JOINED = f"{_OLD} o JOIN {_NEW} n ON o.{_ID} = n.{_ID}"


@dataclasses.dataclass(frozen=True)
class RunInfo:
  """One side of the comparison."""
  run_dir: str
  run_id: Optional[str]
  model_version: Optional[str]
  images: int  # distinct image_ids with a prediction
  # The run's model's training and recalibration warnings, as sentences
  # (busi_core.artifact.run_warning_lines of its manifest).
  model_warnings: Tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Overlap:
  both: int
  only_old: int
  only_new: int


@dataclasses.dataclass(frozen=True)
class Flip:
  """Images predicted `old` by the old run and `new` by the new one."""
  old: str
  new: str
  images: int


@dataclasses.dataclass(frozen=True)
class Bin:
  """Images whose confidence changed by [low, high) (the last bin holds 1)."""
  low: float
  high: float
  images: int


@dataclasses.dataclass(frozen=True)
class ConfidenceChange:
  """new confidence − old confidence over the images in both runs; the
  statistics are None when there are none."""
  images: int
  mean: Optional[float]
  mean_abs: Optional[float]
  minimum: Optional[float]
  p05: Optional[float]
  p25: Optional[float]
  median: Optional[float]
  p75: Optional[float]
  p95: Optional[float]
  maximum: Optional[float]
  increased: int
  decreased: int
  histogram: Tuple[Bin, ...]


@dataclasses.dataclass(frozen=True)
class FlagChange:
  """One flag over the images in both runs.

  `compared` counts the images where both runs recorded the flag (it is
  null without an OOD detector); `recorded` is False when either run's
  Parquet lacks the column, and `note` says which.
  """
  flag: str
  recorded: bool
  compared: int = 0
  old_flagged: int = 0
  new_flagged: int = 0
  newly_flagged: int = 0  # false → true
  unflagged: int = 0  # true → false
  note: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Example:
  """An image whose predicted class changed."""
  image_id: str
  source: str
  old_class: str
  new_class: str
  old_confidence: float
  new_confidence: float


@dataclasses.dataclass(frozen=True)
class Comparison:
  """Everything `compare` prints and writes, as plain values."""
  old: RunInfo
  new: RunInfo
  overlap: Overlap
  classes: Tuple[str, ...]  # row and column order of the flips
  flips: Tuple[Flip, ...]  # every (old, new) pair seen, diagonal included
  changed: int  # images in both whose predicted class differs
  confidence: ConfidenceChange
  flags: Tuple[FlagChange, ...]
  examples: Tuple[Example, ...]  # changed class, largest confidence change

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def _check_run(files: run_files.RunFiles, flag: str) -> None:
  """Refuses what is not a finished run with predictions."""
  where = f"{flag} {files.run_dir}"
  if files.manifest is None:
    raise run_files.RunDirError(
        f"{where} is not a finished run (no {schemas.MANIFEST_FILE}: it"
        " crashed, was stopped or is still running); compare finished runs")
  if files.is_preprocess_run or not files.has_predictions:
    command = files.manifest.get(schemas.MANIFEST_COMMAND,
                                 schemas.COMMAND_PREPROCESS)
    raise run_files.RunDirError(
        f"{where} holds no predictions (a {command} run); pass the --output"
        " of a score or run")
  counts = files.manifest.get(schemas.MANIFEST_COUNTS) or {}
  if counts.get(schemas.COUNT_PREDICTIONS) == 0:
    raise run_files.RunDirError(
        f"{where} holds no predictions: 0 images were scored (see its"
        " summary for why: errors, or every image skipped by"
        " --skip_scored); compare runs that scored images")


@contextlib.contextmanager
def _opened(old: str, new: str) -> Iterator[Tuple[run_files.RunFiles, ...]]:
  with run_files.opened(old, "--old") as old_files, \
      run_files.opened(new, "--new") as new_files:
    _check_run(old_files, "--old")
    _check_run(new_files, "--new")
    yield old_files, new_files


def _connect(old_local: str, new_local: str):
  """A DuckDB connection with views `old` and `new`: one row per image_id.

  Returns:
    (connection, columns of old, columns of new).
  """
  con = duckdb.connect()
  columns = []
  for view, local in ((_OLD, old_local), (_NEW, new_local)):
    rel = con.read_parquet(sql.predictions_glob(local))
    rel.create_view(f"{view}_rows")
    columns.append(frozenset(rel.columns))
    con.execute(
        f"CREATE VIEW {view} AS SELECT * FROM {view}_rows QUALIFY"
        f" row_number() OVER (PARTITION BY {_ID} ORDER BY {_SOURCE}) = 1")
  return con, columns[0], columns[1]


def _run_info(con, view: str, files: run_files.RunFiles) -> RunInfo:
  (images,) = con.execute(f"SELECT count(*) FROM {view}").fetchone()
  manifest = files.manifest or {}
  return RunInfo(files.run_dir, manifest.get(schemas.MANIFEST_RUN_ID),
                 manifest.get(schemas.MANIFEST_MODEL_VERSION), images,
                 tuple(artifact.run_warning_lines(manifest)))


def _overlap(con) -> Overlap:
  return Overlap(*con.execute(
      f"SELECT count(*) FILTER (WHERE o.{_ID} IS NOT NULL AND"
      f" n.{_ID} IS NOT NULL), count(*) FILTER (WHERE n.{_ID} IS NULL),"
      f" count(*) FILTER (WHERE o.{_ID} IS NULL) FROM {_OLD} o FULL OUTER"
      f" JOIN {_NEW} n ON o.{_ID} = n.{_ID}").fetchone())


def _confidence(con) -> ConfidenceChange:
  delta = f"(SELECT n.{_CONFIDENCE} - o.{_CONFIDENCE} AS d FROM {_JOINED})"
  row = con.execute(
      "SELECT count(*), avg(d), avg(abs(d)), min(d),"
      " quantile_cont(d, [0.05, 0.25, 0.5, 0.75, 0.95]), max(d),"
      " count(*) FILTER (WHERE d > 0), count(*) FILTER (WHERE d < 0)"
      f" FROM {delta}").fetchone()
  images, mean, mean_abs, low, quantiles, high, up, down = row
  quantiles = quantiles or [None] * 5
  counts = dict(con.execute(
      f"SELECT least(greatest(floor((d + 1) / {BIN_WIDTH})::INT, 0),"
      f" {_BINS - 1}) AS bin, count(*) FROM {delta} GROUP BY bin").fetchall())
  histogram = tuple(
      Bin(round(-1 + i * BIN_WIDTH, 6), round(-1 + (i + 1) * BIN_WIDTH, 6),
          counts.get(i, 0)) for i in range(_BINS))
  return ConfidenceChange(images, mean, mean_abs, low, *quantiles, high, up,
                          down, histogram)


def _flag(con, flag: str, old_columns, new_columns) -> FlagChange:
  missing = [side for side, columns in ((_OLD, old_columns),
                                        (_NEW, new_columns))
             if flag not in columns]
  if missing:
    return FlagChange(flag, False, note=(
        f"not recorded: the {' and '.join(missing)} run's predictions"
        " predate the column"))
  pairs, *row = con.execute(
      f"SELECT count(*), count(*) FILTER (WHERE o.{flag} IS NOT NULL AND"
      f" n.{flag} IS NOT NULL), count(*) FILTER (WHERE o.{flag}),"
      f" count(*) FILTER (WHERE n.{flag}),"
      f" count(*) FILTER (WHERE NOT o.{flag} AND n.{flag}),"
      f" count(*) FILTER (WHERE o.{flag} AND NOT n.{flag}) FROM {_JOINED}"
  ).fetchone()
  note = None
  # Null on images both runs scored: a model without an OOD detector (with
  # no image in common there is nothing to compare, and nothing to explain).
  if flag == schemas.COLUMN_OUT_OF_DISTRIBUTION and pairs and not row[0]:
    note = ("not compared: a run's model has no OOD detector (the column is"
            " null)")
  return FlagChange(flag, True, *row, note=note)


def _classes(files: Sequence[run_files.RunFiles],
             seen: Sequence[str]) -> Tuple[str, ...]:
  """The models' labels in their order, then any other class seen."""
  order = []
  for f in files:
    for label in (f.manifest or {}).get(schemas.MANIFEST_LABELS) or ():
      if label not in order:
        order.append(label)
  return tuple(order + sorted(set(seen) - set(order)))


def query(old: run_files.RunFiles, new: run_files.RunFiles,
          examples: int = DEFAULT_EXAMPLES) -> Comparison:
  """Runs the comparison's queries over two checked, local runs."""
  con, old_columns, new_columns = _connect(old.local, new.local)
  flips = tuple(Flip(*row) for row in con.execute(
      f"SELECT o.{_PREDICTED}, n.{_PREDICTED}, count(*) FROM"
      f" {_JOINED} GROUP BY ALL ORDER BY 1, 2").fetchall())
  shown = tuple(Example(*row) for row in con.execute(
      f"SELECT o.{_ID}, n.{_SOURCE}, o.{_PREDICTED}, n.{_PREDICTED},"
      f" o.{_CONFIDENCE}, n.{_CONFIDENCE} FROM {_JOINED}"
      f" WHERE o.{_PREDICTED} <> n.{_PREDICTED}"
      f" ORDER BY abs(n.{_CONFIDENCE} - o.{_CONFIDENCE}) DESC, n.{_SOURCE}"
      " LIMIT ?",
      [examples]).fetchall())
  return Comparison(
      old=_run_info(con, _OLD, old), new=_run_info(con, _NEW, new),
      overlap=_overlap(con),
      classes=_classes((old, new), [c for f in flips for c in (f.old, f.new)]),
      flips=flips,
      changed=sum(f.images for f in flips if f.old != f.new),
      confidence=_confidence(con),
      flags=tuple(_flag(con, flag, old_columns, new_columns)
                  for flag in FLAGS),
      examples=shown)


def compare(old: str, new: str,
            examples: int = DEFAULT_EXAMPLES) -> Comparison:
  """Compares two runs' predictions.

  Args:
    old, new: run output directories, local or gs://.
    examples: most changed-class images to list.

  Raises:
    run_files.RunDirError: a run that is missing, unfinished, has no
      predictions, or whose Parquet DuckDB cannot read.
  """
  with _opened(old, new) as (old_files, new_files):
    try:
      return query(old_files, new_files, examples)
    except (duckdb.IOException, duckdb.InvalidInputException) as e:
      raise run_files.RunDirError(
          f"cannot read the predictions of --old {old} or --new {new}"
          f" ({str(e).splitlines()[0]}); the files are damaged or not a"
          " run's") from e


# Comparison → text, HTML


def _num(value) -> str:
  return "n/a" if value is None else f"{value:+.3f}"


def _flip_matrix(c: Comparison) -> Tuple[List[str], List[list]]:
  """Rows: old class; columns: new class; cells: images."""
  cells = {(f.old, f.new): f.images for f in c.flips}
  header = ["old \\ new"] + list(c.classes)
  rows = [[old] + [cells.get((old, new), 0) for new in c.classes]
          for old in c.classes]
  return header, rows


def _flag_rows(c: Comparison) -> List[tuple]:
  return [(f.flag, f.compared, f.old_flagged, f.new_flagged, f.newly_flagged,
           f.unflagged) if f.recorded and not f.note else
          (f.flag, f.note, "", "", "", "") for f in c.flags]


_FLAG_COLUMNS = ("flag", "compared", "old_flagged", "new_flagged",
                 "newly_flagged", "unflagged")
_CONFIDENCE_COLUMNS = ("images", "mean", "mean_abs", "min", "p05", "p25",
                       "median", "p75", "p95", "max", "increased",
                       "decreased")


def _confidence_row(k: ConfidenceChange) -> tuple:
  return (k.images, _num(k.mean), _num(k.mean_abs), _num(k.minimum),
          _num(k.p05), _num(k.p25), _num(k.median), _num(k.p75),
          _num(k.p95), _num(k.maximum), k.increased, k.decreased)


def _run_rows(c: Comparison) -> List[tuple]:
  return [(side, r.run_id, r.model_version, r.images, r.run_dir)
          for side, r in ((_OLD, c.old), (_NEW, c.new))]


def _warnings(c: Comparison) -> List[str]:
  """Each run's model's training and recalibration warnings, naming the
  run."""
  return [f"WARNING ({side} run): {line}"
          for side, r in ((_OLD, c.old), (_NEW, c.new))
          for line in r.model_warnings]


def format_text(c: Comparison) -> str:
  """The comparison as the text tables `compare` prints."""
  header, rows = _flip_matrix(c)
  parts = _warnings(c) + [
      summary.text_table("Runs", ("run", "run_id", "model_version",
                                  "images", "dir"), _run_rows(c)),
      summary.text_table("Images", ("both", "only_old", "only_new"),
                         [dataclasses.astuple(c.overlap)]),
      summary.text_table(
          f"Predicted class, old → new ({c.changed} of {c.overlap.both}"
          " changed)", header, rows),
      summary.text_table("Confidence change (new − old)",
                         _CONFIDENCE_COLUMNS,
                         [_confidence_row(c.confidence)]),
      summary.text_table(
          "Confidence change distribution", ("from", "to", "images"),
          [(f"{b.low:+.1f}", f"{b.high:+.1f}", b.images)
           for b in c.confidence.histogram if b.images]),
      summary.text_table("Flags (images in both runs)", _FLAG_COLUMNS,
                         _flag_rows(c)),
  ]
  if c.examples:
    parts.append(summary.text_table(
        f"Changed class, largest confidence change first (top"
        f" {len(c.examples)})",
        ("source", "old", "new", "old_confidence", "new_confidence"),
        [(e.source, e.old_class, e.new_class, e.old_confidence,
          e.new_confidence) for e in c.examples]))
  return "\n\n".join(parts)


def render_html(c: Comparison) -> str:
  """A self-contained page in the run report's look; values escaped."""
  e, table, section = report.escape, report.html_table, report.html_section
  header, rows = _flip_matrix(c)
  k = c.confidence
  biggest = max((b.images for b in k.histogram), default=0) or 1
  bars = "".join(
      f'<tr><td class="num">{b.low:+.1f} … {b.high:+.1f}</td>'
      f'<td class="num">{b.images}</td><td><div style="background:#3b75af;'
      f'height:10px;width:{round(300 * b.images / biggest)}px"></div></td>'
      "</tr>" for b in k.histogram if b.images)
  sections = [
      section("runs", "Runs", report.html_warnings(
          "model-warning", _warnings(c)) + table(
              "runs", ("run", "run id", "model version", "images",
                       "directory"), _run_rows(c), numeric=(3,))),
      section("images", "Images", table(
          "overlap", ("in both", "only old", "only new"),
          [dataclasses.astuple(c.overlap)], numeric=(0, 1, 2))),
      section("flips", "Predicted class, old → new", (
          f'<p class="big">{e(c.changed)} of {e(c.overlap.both)} images'
          " changed class</p>" + table("flip-matrix", header, rows,
                                       numeric=range(1, len(header))))),
      section("confidence", "Confidence change (new − old)", (
          table("confidence-change", _CONFIDENCE_COLUMNS,
                [_confidence_row(k)], numeric=range(len(_CONFIDENCE_COLUMNS)))
          + '<table id="confidence-histogram"><thead><tr><th>change</th>'
          f"<th>images</th><th></th></tr></thead><tbody>{bars}</tbody>"
          "</table>")),
      section("flags", "Flags", table("flag-changes", _FLAG_COLUMNS,
                                      _flag_rows(c),
                                      numeric=(1, 2, 3, 4, 5))),
  ]
  if c.examples:
    sections.append(section("examples", "Changed class", table(
        "changed-examples", ("source", "old", "new", "old confidence",
                             "new confidence"),
        [(x.source, x.old_class, x.new_class, f"{x.old_confidence:.3f}",
          f"{x.new_confidence:.3f}") for x in c.examples], numeric=(3, 4))))
  title = (f"BUSI run comparison · {c.old.model_version} → "
           f"{c.new.model_version}")
  return (
      "<!DOCTYPE html>\n"
      '<html lang="en"><head><meta charset="utf-8">'
      f"<title>{e(title)}</title><style>{report.CSS}</style></head><body>"
      f"<header><h1>{e(title)}</h1><p>{e(c.old.run_dir)} → "
      f"{e(c.new.run_dir)}</p></header><main>{''.join(sections)}</main>"
      "</body></html>\n")


def write(c: Comparison, output: str) -> Tuple[str, str]:
  """Writes `output/comparison.json` and `output/comparison.html` (local or
  gs://); returns their paths."""
  base = output.rstrip("/") or output
  paths = (FileSystems.join(base, JSON_FILE), FileSystems.join(base, HTML_FILE))
  if "://" not in output:
    os.makedirs(output, exist_ok=True)
  texts = (json.dumps(c.to_json(), indent=2) + "\n", render_html(c))
  for path, text, mime in zip(paths, texts, ("application/json",
                                             "text/html")):
    with FileSystems.create(path, mime_type=mime) as f:
      f.write(text.encode("utf-8"))
  return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m beam_pipeline compare",
      description="How two scored runs agree, joined on image_id: prints"
                  f" text tables, writes DIR/{JSON_FILE} and DIR/{HTML_FILE}.",
      allow_abbrev=False)
  parser.add_argument("--old", required=True, metavar="RUN",
                      help="The earlier run's output directory (local or"
                           " gs://).")
  parser.add_argument("--new", required=True, metavar="RUN",
                      help="The later run's output directory (local or"
                           " gs://).")
  parser.add_argument("--output", required=True, metavar="DIR",
                      help=f"Where to write {JSON_FILE} and {HTML_FILE}"
                           " (local or gs://).")
  parser.add_argument("--examples", type=int, default=DEFAULT_EXAMPLES,
                      help="Most changed-class images to list.")
  args = spelling.parse_args(parser, argv)
  if args.examples < 0:
    parser.error("--examples must be >= 0")
  output_dirs.check_is_directory(args.output)  # before the run is read
  gcs.configure_for_emulator()
  comparison = compare(args.old, args.new, args.examples)
  print(format_text(comparison))
  for path in write(comparison, args.output):
    print(path)
  return 0
