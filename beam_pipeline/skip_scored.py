"""Incremental scoring, `--skip_scored RUN_DIR_GLOB`: images whose image_id
already has a prediction by the same model version in earlier runs are left
out of scoring and counted as `already_scored`.

`find_runs` resolves the globs at launch, before the output is touched: each
directory they match must be a finished score or run with predictions, so a
typo is a one-line refusal rather than a run that silently rescored
everything. `SkipScored` reads those runs' predictions Parquet once in the
job (only the image_id and model_version columns, through Beam's
FileSystems: local or gs://) into one set of image_ids, a side input of the
filter in front of scoring.
"""

import glob
import json
import logging
import operator
import os
import posixpath
from typing import Iterable, List, NamedTuple, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

import schemas
from beam_pipeline import outputs, progress
from schemas import records

_LOG = logging.getLogger(__name__)

ALREADY_SCORED = "already_scored"  # the tagged output of `_split`
_COLUMNS = (schemas.COLUMN_IMAGE_ID, schemas.COLUMN_MODEL_VERSION)
_FLAG = "--skip_scored"


class ScoredRun(NamedTuple):
  """One earlier run whose predictions are skipped."""
  run_dir: str
  run_id: Optional[str]
  model_version: Optional[str]  # as its manifest says


class ScoredRuns(NamedTuple):
  """What `--skip_scored` matched at launch.

  Attributes:
    globs: the globs as given.
    runs: the run directories matched (the run's own --output left out).
    files: their predictions Parquet files, read by `SkipScored`.
  """
  globs: Tuple[str, ...]
  runs: Tuple[ScoredRun, ...]
  files: Tuple[str, ...]

  def manifest_field(self) -> dict:
    """The manifest's record of what was skipped against."""
    return {schemas.SKIP_SCORED_GLOBS: list(self.globs),
            schemas.SKIP_SCORED_RUNS: [run._asdict() for run in self.runs]}


class NoScoredRuns(ValueError):
  """A `--skip_scored` glob names no finished run with predictions."""


def _matched(pattern: str) -> List[str]:
  return [m.path for result in FileSystems.match([pattern])
          for m in result.metadata_list]


def _parent(path: str, levels: int = 1) -> str:
  for _ in range(levels):
    path = posixpath.dirname(path.rstrip("/"))
  return path


def _read_manifest(uri: str) -> dict:
  with FileSystems.open(uri, compression_type="uncompressed") as f:
    return json.loads(f.read().decode())


def _candidates(pattern: str) -> Tuple[dict, dict]:
  """Directories `pattern` matches → their manifest URI and prediction
  files (either may be missing)."""
  base = pattern.rstrip("/") or pattern
  manifests = {_parent(path): path
               for path in _matched(outputs.join(base, schemas.MANIFEST_FILE))}
  files = {}
  for path in _matched(outputs.join(base, schemas.PREDICTIONS_DIR,
                                    "*.parquet")):
    files.setdefault(_parent(path, 2), []).append(path)
  if "://" not in pattern:
    # Local folders exist without files: a folder the glob names that holds
    # no run is refused by name, not passed over.
    for path in glob.glob(base):
      if os.path.isdir(path):
        path = path.rstrip("/")
        manifests.setdefault(path, None)
  return manifests, files


def _where(pattern: str, run_dir: str) -> str:
  """`--skip_scored GLOB: DIR`, or `--skip_scored DIR` when they agree."""
  if pattern.rstrip("/") == run_dir:
    return f"{_FLAG} {run_dir}"
  return f"{_FLAG} {pattern}: {run_dir}"


def _check(pattern: str, run_dir: str, manifest_uri: Optional[str],
           files: Sequence[str]) -> ScoredRun:
  where = _where(pattern, run_dir)
  if manifest_uri is None:
    if not files:
      raise NoScoredRuns(
          f"{where} holds no run (no"
          f" {schemas.MANIFEST_FILE}, no {schemas.PREDICTIONS_DIR}/*.parquet);"
          " pass a glob of earlier score or run --output directories")
    raise NoScoredRuns(
        f"{where} is not a finished run (no"
        f" {schemas.MANIFEST_FILE}: it crashed, was stopped or is still"
        " running); rerun it, or leave it out of the glob")
  manifest = _read_manifest(manifest_uri)
  if not files:
    command = manifest.get(schemas.MANIFEST_COMMAND,
                           schemas.COMMAND_PREPROCESS)
    raise NoScoredRuns(
        f"{where} holds no predictions (a {command} run); pass a glob of"
        " earlier score or run --output directories")
  return ScoredRun(run_dir, manifest.get(schemas.MANIFEST_RUN_ID),
                   manifest.get(schemas.MANIFEST_MODEL_VERSION))


def find_runs(globs: Iterable[str], output: str,
              model_version: Optional[str] = None) -> ScoredRuns:
  """The earlier runs `--skip_scored` names, checked.

  Args:
    globs: globs of run output directories, local or gs://.
    output: this run's --output, never one of them (it is emptied before
      the job reads anything).
    model_version: this run's model version, to warn when no run matched
      has it (nothing would be skipped).

  Returns:
    The runs and their predictions Parquet files.

  Raises:
    NoScoredRuns: a glob that matches no run directory, or a matched
      directory that is not a finished run with predictions.
  """
  globs = tuple(globs)
  here = outputs.location(output)
  runs, files = {}, []
  for pattern in globs:
    manifests, predictions = _candidates(pattern)
    found = []
    for run_dir in sorted(set(manifests) | set(predictions)):
      if outputs.location(run_dir) == here:
        _LOG.info("%s %s: leaving out %s, this run's own --output", _FLAG,
                  pattern, run_dir)
        continue
      found.append(_check(pattern, run_dir, manifests.get(run_dir),
                          predictions.get(run_dir, ())))
    if not found:
      raise NoScoredRuns(
          f"{_FLAG} {pattern} matches no run directory (none holds"
          f" {schemas.MANIFEST_FILE} and {schemas.PREDICTIONS_DIR}/*.parquet"
          " apart from this run's --output); pass a glob of earlier score or"
          " run --output directories")
    for run in found:
      if run.run_dir not in runs:
        runs[run.run_dir] = run
        files += sorted(predictions[run.run_dir])
  if model_version is not None and all(
      run.model_version != model_version for run in runs.values()):
    _LOG.warning("%s: none of the %d runs matched was scored by model version"
                 " %s; every image is scored", _FLAG, len(runs),
                 model_version)
  _LOG.info("%s: skipping images scored by model version %s in %d runs",
            _FLAG, model_version, len(runs))
  return ScoredRuns(globs, tuple(runs.values()), tuple(files))


def of_version(row: dict, model_version: str) -> bool:
  """A predictions row of `model_version`."""
  return row[schemas.COLUMN_MODEL_VERSION] == model_version


def _split(record: records.ImageRecord, scored: frozenset):
  """An image to score, or its image_id on ALREADY_SCORED."""
  if record.image_id in scored:
    progress.count(schemas.COUNTER_ALREADY_SCORED)
    yield beam.pvalue.TaggedOutput(ALREADY_SCORED, record.image_id)
  else:
    yield record


class SkipScored(beam.PTransform):
  """ImageRecords → those without a prediction by `model_version` in
  `files` (earlier runs' predictions Parquet).

  Returns a dict: "images" (to score) and "already_scored" (a singleton
  count of those left out).
  """

  def __init__(self, files: Sequence[str], model_version: str):
    super().__init__()
    self._files = list(files)
    self._model_version = model_version

  def expand(self, images):
    # One set of ids, read once: a side input every worker holds whole
    # (about 150 bytes an image id, so some 150 MB for a million images).
    scored = (
        images.pipeline
        | "ScoredFiles" >> beam.Create(self._files)
        | "ReadScored" >> beam.io.ReadAllFromParquet(columns=list(_COLUMNS))
        | "SameModelVersion" >> beam.Filter(of_version, self._model_version)
        | "ScoredIds" >> beam.Map(operator.itemgetter(schemas.COLUMN_IMAGE_ID))
        | "ScoredIdSet" >> beam.CombineGlobally(_IdSet()))
    split = images | "LeaveOutScored" >> beam.FlatMap(
        _split, beam.pvalue.AsSingleton(scored)).with_outputs(
            ALREADY_SCORED, main="images")
    return {"images": split.images,
            "already_scored": outputs.count(split[ALREADY_SCORED],
                                            "CountAlreadyScored")}


class _IdSet(beam.CombineFn):
  """image_ids → one frozenset (empty when no row matched)."""

  def create_accumulator(self):
    return set()

  def add_input(self, accumulator, element):
    accumulator.add(element)
    return accumulator

  def merge_accumulators(self, accumulators):
    merged = set()
    for accumulator in accumulators:
      merged |= accumulator
    return merged

  def extract_output(self, accumulator):
    return frozenset(accumulator)
