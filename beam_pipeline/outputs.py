"""Writing a run's outputs: TFRecords, Parquet tables and the manifest.

Beam's file sinks write to temporary files and rename them into place only
when the whole write succeeded, so a crashed run leaves no partial shard under
the final names. The manifest is written last, through a temporary name; its
presence marks a completed run.
"""

import contextlib
import datetime
import fnmatch
import json
import logging
import os
import posixpath
import time
from typing import Dict, List, Mapping, Optional, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

import schemas
from beam_pipeline import failures, output_lock
from busi_core import flag_rates, output_dirs
from busi_core.tfrecord_io import WriteGzipTFRecords

_LOG = logging.getLogger(__name__)

OUTPUT_SUBDIRS = (schemas.TFRECORD_DIR, schemas.ERRORS_DIR,
                  schemas.PREDICTIONS_DIR, schemas.GRADCAM_DIR)


def join(directory: str, *parts: str) -> str:
  return FileSystems.join(directory.rstrip("/"), *parts)


def new_run_id() -> str:
  """A sortable, unique id: UTC time plus random suffix."""
  import uuid  # pylint: disable=import-outside-toplevel
  now = datetime.datetime.now(datetime.timezone.utc)
  return f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def utc_now_iso() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="seconds")


class OutputDirInUse(ValueError):
  """The output may not be used: a completed run, or the run's own inputs."""


def location(path: str) -> str:
  """Where a path really is, for comparing two spellings of it.

  Local paths are made absolute with symlinks, `.`/`..` and repeated
  slashes resolved; URIs (gs://...) keep their scheme and bucket, with
  repeated slashes and `.`/`..` segments in the object path collapsed.
  """
  if "://" not in path:
    return os.path.realpath(os.path.abspath(path))
  scheme, rest = path.split("://", 1)
  bucket, _, name = rest.partition("/")
  name = posixpath.normpath("/" + name).lstrip("/") if name else ""
  return f"{scheme.lower()}://{bucket}/{name}".rstrip("/")


def _inside(path: str, directory: str) -> bool:
  return path == directory or path.startswith(directory.rstrip("/") + "/")


def check_inputs_apart(output: str, inputs: Sequence[str],
                       matched: Optional[Sequence[str]] = None) -> None:
  """Refuses an output that holds one of the run's inputs, or lies in one.

  Both the inputs as spelled (a folder, a glob) and the files they match
  are compared with the output as locations, not strings: `./o`, `o//`,
  `x/../o`, an absolute path or a symlink to `o` all name `o`.

  Raises:
    OutputDirInUse: an input lies in the output (a rerun would delete or
      overwrite it), or the output lies in an input (the run would read its
      own outputs).
  """
  if not inputs:
    return
  out = location(output)
  if matched is None:
    matched = sorted({m.path for result in FileSystems.match(list(inputs))
                      for m in result.metadata_list})
  for path in list(inputs) + matched:
    where = location(path)
    if _inside(where, out):
      raise OutputDirInUse(
          f"--input {path} lies in --output {output}, where this run (or a"
          " rerun) would write over or delete it; write to another --output")
    if _inside(out, where):
      raise OutputDirInUse(
          f"--output {output} lies in --input {path}; the run would read its"
          " own outputs. Write to another --output")


def check_is_directory(output: str) -> None:
  """Refuses a local `output` that is a file, or lies under one.

  Raises:
    OutputDirInUse: naming the file and what to pass instead.
  """
  output_dirs.check_is_directory(output, OutputDirInUse,
                                 "new, or holding an earlier run")


# A write-then-delete probe in the output, made before anything is deleted.
_PROBE_PREFIX = ".busi-write-probe-"
# write_json's temporary name: `<name>.tmp`, renamed into place.
_TMP_SUFFIX = ".tmp"
# What a run that stopped part-way may leave at the top of the output:
# Beam's FileBasedSink temporary folders (`beam-temp-<prefix>-<uuid>`; ours
# are inside the OUTPUT_SUBDIRS, which are emptied whole), the manifest's
# temporary file and a probe.
_TOP_LEVEL_LEFTOVERS = ("beam-temp-*", schemas.MANIFEST_FILE + _TMP_SUFFIX,
                        _PROBE_PREFIX + "*")


def check_writable(output: str) -> None:
  """Creates, writes and removes a small probe file in `output`.

  Local output folders are created on the way. On Cloud Storage the probe is
  an object, written and deleted through the same FileSystems calls the run
  uses.

  Raises:
    OutputNotWritable: with one line naming the cause (read-only, no space
      left, permission denied, ...) and what to do.
  """
  import uuid  # pylint: disable=import-outside-toplevel
  probe = join(output, _PROBE_PREFIX + uuid.uuid4().hex)
  try:
    with FileSystems.create(probe) as f:
      # Some data, not just a name: a full disk often still has inodes.
      f.write(b"busi write probe\n")
    FileSystems.delete([probe])
  except Exception as e:  # pylint: disable=broad-except
    # A full disk fails at close, after the (empty) file was made.
    with contextlib.suppress(Exception):
      FileSystems.delete([probe])
    raise not_writable(output, e) from e


def not_writable(output: str,
                 error: Exception) -> failures.OutputNotWritable:
  """The one-line refusal for a write to `output` that failed with `error`
  (the probe's, or the run lock's)."""
  cause = failures.io_cause(error)
  if cause is None:
    reason, advice = (f"{type(error).__name__}: {str(error).splitlines()[0]}"
                      if str(error) else type(error).__name__,
                      "choose another --output")
  else:
    reason, advice = cause.reason, cause.advice
  return failures.OutputNotWritable(
      f"cannot write to {output}: {reason} — {advice}")


def leftovers(output: str) -> List[str]:
  """Everything an earlier run left in `output` that a new run replaces.

  Every file and folder inside the OUTPUT_SUBDIRS (Beam's `beam-temp-*`
  folders included), and at the top level Beam temporary folders, the
  manifest's temporary file and write probes. The manifest itself and any
  other file of the user's are not listed.
  """
  if "://" in output:
    # Object stores have no folders: "**" matches objects at any depth
    # under a prefix, so temporary "folders" are listed object by object.
    patterns = [join(output, sub, "**") for sub in OUTPUT_SUBDIRS]
    patterns += [join(output, name.replace("*", "**"))
                 for name in _TOP_LEVEL_LEFTOVERS]
    return sorted({m.path for result in FileSystems.match(patterns)
                   for m in result.metadata_list})
  # FileSystems.match lists files only; an empty beam-temp folder (a run
  # killed before its first shard) would stay. Folders are deleted whole.
  found = []
  for sub in OUTPUT_SUBDIRS:
    folder = join(output, sub)
    if os.path.isdir(folder):
      found += [join(folder, name) for name in os.listdir(folder)]
  if os.path.isdir(output):
    found += [join(output, name) for name in os.listdir(output)
              if any(fnmatch.fnmatchcase(name, pattern)
                     for pattern in _TOP_LEVEL_LEFTOVERS)]
  return sorted(found)


def prepare_output_dir(output: str, overwrite: bool,
                       inputs: Sequence[str] = (),
                       matched: Optional[Sequence[str]] = None) -> None:
  """Makes `output` ready for a new run, or refuses.

  Call it holding the output's lock (output_lock.claim): the leftovers it
  removes are then no other live run's files. In this order, so that
  nothing is deleted unless the run can go ahead: the output is checked to
  be no file; the inputs are checked to lie apart from the output; a
  completed run (a manifest) is refused unless `overwrite`; the output is
  probed for writability; then the manifest of the run being replaced and every
  leftover of an earlier run (partial shards, Beam's `beam-temp-*` folders,
  temporary files) are removed, so rerunning the same command after a
  crash, a kill or Ctrl-C completes cleanly.

  Args:
    output: the run's output directory.
    overwrite: replace a completed run.
    inputs: the run's inputs (globs or paths, as given or as matched).
    matched: the paths the inputs matched, if already known (otherwise
      they are matched here).

  Raises:
    OutputDirInUse: a completed run is there and overwrite is False, an
      input lies in the output or the output in an input, or the output is
      a file.
    OutputNotWritable: the probe write failed (read-only, full, no
      permission).
  """
  check_is_directory(output)
  check_inputs_apart(output, inputs, matched)
  manifest = join(output, schemas.MANIFEST_FILE)
  completed = FileSystems.exists(manifest)
  if completed and not overwrite:
    raise OutputDirInUse(
        f"{output} already holds a completed run ({manifest}). Choose a new"
        " --output, or pass --overwrite to replace it.")
  check_writable(output)
  # The manifest first: from here on the directory is no completed run.
  if completed:
    FileSystems.delete([manifest])
  stale = leftovers(output)
  if stale:
    _LOG.warning("Removing %d outputs of an earlier, unfinished or replaced"
                 " run in %s", len(stale), output)
    FileSystems.delete(stale)


class WriteExamples(beam.PTransform):
  """Serialized Examples → gzip TFRecord shards `DIR/tfrecords/*.tfrecord.gz`,
  each of at most `max_records_per_shard` records (None: no limit)."""

  def __init__(self, output: str, max_records_per_shard: Optional[int] = None):
    super().__init__()
    self._prefix = join(output, schemas.TFRECORD_DIR, "part")
    self._max_records = max_records_per_shard

  def expand(self, examples):
    return examples | "WriteTFRecords" >> WriteGzipTFRecords(
        self._prefix, schemas.TFRECORD_SUFFIX,
        max_records_per_shard=self._max_records)


class WriteTable(beam.PTransform):
  """Row dicts → `DIR/<subdir>/part-*.parquet` with a fixed schema."""

  def __init__(self, output: str, subdir: str, schema):
    super().__init__()
    self._prefix = join(output, subdir, "part")
    self._schema = schema

  def expand(self, rows):
    return rows | "WriteParquet" >> beam.io.WriteToParquet(
        self._prefix, self._schema, file_name_suffix=".parquet",
        row_group_buffer_size=16 * 1024 * 1024)


def count(pcoll, label: str):
  """Singleton count of a PCollection (0 when empty)."""
  return pcoll | label >> beam.combiners.Count.Globally()


def write_json(uri: str, payload: Mapping) -> None:
  """Writes JSON through a temporary name, then renames it into place."""
  tmp = uri + _TMP_SUFFIX
  with FileSystems.create(tmp) as f:
    f.write(json.dumps(payload, indent=2, sort_keys=False).encode())
  if FileSystems.exists(uri):
    FileSystems.delete([uri])
  FileSystems.rename([tmp], [uri])


def read_json(uri: str):
  with FileSystems.open(uri) as f:
    return json.loads(f.read().decode())


def finish_manifest(base: Dict, counts: Dict[str, int],
                    started: float) -> Dict:
  """The manifest: fixed fields, counts, the invariant check and timings."""
  manifest = dict(base)
  manifest[schemas.MANIFEST_COUNTS] = dict(counts)
  scored = schemas.COUNT_PREDICTIONS in counts
  outcome = (schemas.COUNT_PREDICTIONS if scored
             else schemas.COUNT_IMAGES_WRITTEN)
  accounted = (counts[outcome] + counts[schemas.COUNT_MASKS_SKIPPED]
               + counts[schemas.COUNT_ERRORS])
  terms = [outcome]
  # --skip_scored: images left out of scoring are outcomes too; the rule
  # names them only in runs that count them.
  if schemas.COUNT_ALREADY_SCORED in counts:
    accounted += counts[schemas.COUNT_ALREADY_SCORED]
    terms.append(schemas.COUNT_ALREADY_SCORED)
  # A multi-frame DICOM is one member read and one outcome per frame: its
  # frames beyond the first are added to the members side (and named in the
  # rule when there are any).
  seen = counts[schemas.COUNT_MEMBERS_SEEN]
  members = [schemas.COUNT_MEMBERS_SEEN]
  if counts.get(schemas.COUNT_EXTRA_FRAMES):
    seen += counts[schemas.COUNT_EXTRA_FRAMES]
    members.append(schemas.COUNT_EXTRA_FRAMES)
  terms += [schemas.COUNT_MASKS_SKIPPED, schemas.COUNT_ERRORS]
  holds = accounted == seen
  manifest[schemas.MANIFEST_INVARIANT] = {
      schemas.INVARIANT_RULE: "{} = {}".format(" + ".join(members),
                                               " + ".join(terms)),
      schemas.INVARIANT_HOLDS: holds,
  }
  if not holds:
    _LOG.error("Manifest invariant broken: %s seen, %s accounted for",
               counts[schemas.COUNT_MEMBERS_SEEN], accounted)
  # The invariant counts what was read; these count what the inputs promised
  # and the run could not read at all (a shard broken mid-way, an input gone
  # since launch). Either makes the output incomplete, however well the rest
  # adds up.
  lost = {name: counts[name] for name in schemas.LOSS_COUNTS
          if counts.get(name)}
  manifest[schemas.MANIFEST_COMPLETE] = holds and not lost
  manifest[schemas.MANIFEST_INCOMPLETE_BECAUSE] = lost
  manifest[schemas.MANIFEST_FINISHED_AT] = utc_now_iso()
  wall_time_s = round(time.time() - started, 3)
  manifest[schemas.MANIFEST_WALL_TIME_S] = wall_time_s
  if scored and wall_time_s > 0:
    manifest[schemas.MANIFEST_THROUGHPUT] = round(
        counts[schemas.COUNT_PREDICTIONS] / wall_time_s, 3)
  if scored and schemas.MANIFEST_FLAG_RATES in base:
    # The base holds the artifact's expected shares; the run's counts
    # against them.
    manifest[schemas.MANIFEST_FLAG_RATES] = flag_rates.check(
        base[schemas.MANIFEST_FLAG_RATES], counts)
    for line in flag_rates.warnings(manifest[schemas.MANIFEST_FLAG_RATES]):
      _LOG.warning("%s", line)
  return manifest


def _write_manifest(unused_element, output: str, base: Dict, started: float,
                    **side) -> Dict:
  """Side inputs: c_* counts, x_* extra fields, f_* written files (these are
  only waited on, so that the manifest comes last)."""
  merged = dict(base)
  merged.update({k[2:]: v for k, v in side.items() if k.startswith("x_")})
  counts = {k[2:]: v for k, v in side.items() if k.startswith("c_")}
  manifest = finish_manifest(merged, counts, started)
  write_json(join(output, schemas.MANIFEST_FILE), manifest)
  # The run is complete: the next may use the directory.
  output_lock.release(output, base[schemas.MANIFEST_RUN_ID])
  return manifest


class WriteManifest(beam.PTransform):
  """Writes `DIR/manifest.json` once every other output is written.

  Args:
    output: the run's output directory.
    base: fixed fields (run_id, inputs, image_size, versions, ...).
    started: launch time (time.time()) for the wall time.
    counts: name → singleton count PCollection.
    written: name → PCollection of written file names, waited on.
  """

  def __init__(self, output: str, base: Dict, started: float,
               counts: Dict[str, beam.PCollection],
               written: Dict[str, beam.PCollection],
               extra: Optional[Dict[str, beam.PCollection]] = None):
    super().__init__()
    self._output = output
    self._base = base
    self._started = started
    self._counts = counts
    self._written = written
    self._extra = extra or {}

  def expand(self, pbegin):
    counts = {
        name: beam.pvalue.AsSingleton(pc) for name, pc in self._counts.items()
    }
    files = {name: beam.pvalue.AsList(pc) for name, pc in self._written.items()}
    extra = {name: beam.pvalue.AsSingleton(pc)
             for name, pc in self._extra.items()}

    kwargs = {f"c_{k}": v for k, v in counts.items()}
    kwargs.update({f"f_{k}": v for k, v in files.items()})
    kwargs.update({f"x_{k}": v for k, v in extra.items()})
    return (pbegin
            | "Once" >> beam.Create([None])
            | "WriteManifest" >> beam.Map(_write_manifest, self._output,
                                          self._base,
                                          self._started, **kwargs))
