"""Writing a run's outputs: TFRecords, Parquet tables and the manifest.

Beam's file sinks write to temporary files and rename them into place only
when the whole write succeeded, so a crashed run leaves no partial shard under
the final names. The manifest is written last, through a temporary name; its
presence marks a completed run.
"""

import datetime
import json
import logging
import os
import posixpath
import time
from typing import Dict, Mapping, Optional, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

import schemas
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
  pass


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


def prepare_output_dir(output: str, overwrite: bool,
                       inputs: Sequence[str] = ()) -> None:
  """Makes `output` ready for a new run, or refuses.

  A directory holding a completed run (a manifest) is refused unless
  `overwrite`; leftovers of an interrupted run (outputs but no manifest) are
  removed, so rerunning the same command after a crash completes cleanly.

  Args:
    output: the run's output directory.
    overwrite: replace a completed run.
    inputs: the run's input globs: refused if replacing the output would
      delete one of their files (e.g. scoring DIR/tfrecords into DIR).

  Raises:
    OutputDirInUse: a completed run is there and overwrite is False, or the
      inputs lie in the outputs this run would replace.
  """
  manifest = join(output, schemas.MANIFEST_FILE)
  completed = FileSystems.exists(manifest)
  if completed and not overwrite:
    raise OutputDirInUse(
        f"{output} already holds a completed run ({manifest}). Choose a new"
        " --output, or pass --overwrite to replace it.")
  stale = set()
  for sub in OUTPUT_SUBDIRS:
    # "*" finds local files and folders (deleted whole); "**" finds objects
    # at any depth on gs://, where Beam's temporary folders are prefixes.
    for result in FileSystems.match([join(output, sub, "*"),
                                     join(output, sub, "**")]):
      stale.update(m.path for m in result.metadata_list)
  stale = sorted(stale)
  wanted = {m.path for result in FileSystems.match(list(inputs))
            for m in result.metadata_list} if inputs else set()
  # Compared as locations, not strings: `./o`, `o//`, an absolute path or a
  # symlink to o name the same files, and replacing them would delete the
  # run's own inputs.
  replaced = [location(join(output, sub)) for sub in OUTPUT_SUBDIRS]
  clash = sorted(path for path in wanted
                 if any(_inside(location(path), d) for d in replaced))
  if clash:
    raise OutputDirInUse(
        f"--input {clash[0]} lies in {output}, whose outputs this run would"
        " replace; write to another --output")
  if completed:
    FileSystems.delete([manifest])
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
  tmp = uri + ".tmp"
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
  manifest["counts"] = dict(counts)
  scored = "predictions" in counts
  outcomes = counts["predictions"] if scored else counts["images_written"]
  accounted = outcomes + counts["masks_skipped"] + counts["errors"]
  manifest["invariant"] = {
      "rule": "members_seen = {} + masks_skipped + errors".format(
          "predictions" if scored else "images_written"),
      "holds": accounted == counts["members_seen"],
  }
  if not manifest["invariant"]["holds"]:
    _LOG.error("Manifest invariant broken: %s seen, %s accounted for",
               counts["members_seen"], accounted)
  # The invariant counts what was read; these count what the inputs promised
  # and the run could not read at all (a shard broken mid-way, an input gone
  # since launch). Either makes the output incomplete, however well the rest
  # adds up.
  lost = {name: counts[name] for name in schemas.LOSS_COUNTS
          if counts.get(name)}
  manifest["complete"] = manifest["invariant"]["holds"] and not lost
  manifest["incomplete_because"] = lost
  manifest["finished_at"] = utc_now_iso()
  manifest["wall_time_s"] = round(time.time() - started, 3)
  if scored and manifest["wall_time_s"] > 0:
    manifest["throughput_images_per_s"] = round(
        counts["predictions"] / manifest["wall_time_s"], 3)
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
