"""Pipeline wiring: `build_*` only add steps; `run` parses flags, builds, runs."""

import logging
import time
from typing import Dict, List, NamedTuple, Optional, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import (PipelineOptions,
                                                  StandardOptions)

import schemas
from beam_pipeline import options as opts_lib
from beam_pipeline import gcs, inputs, outputs
from busi_core import archives
from beam_pipeline.preprocess import PreprocessLimits, ReadImages

_LOG = logging.getLogger(__name__)


def manifest_base(command: str, opts: opts_lib.BusiOptions, run_id: str,
                  image_size: int, paths: Sequence[str]) -> Dict:
  return {
      "run_id": run_id,
      "command": command,
      "inputs": [inputs.display(pattern) for pattern in opts.input],
      "inputs_matched": len(paths),
      "output": opts.output,
      "image_size": image_size,
      "format_version": schemas.FORMAT_VERSION,
      "package_version": schemas.PACKAGE_VERSION,
      "started_at": outputs.utc_now_iso(),
  }


def build_preprocess(p: beam.Pipeline, opts: opts_lib.BusiOptions,
                     run_id: str, paths: Sequence[str],
                     image_size: Optional[int] = None) -> Dict:
  """Adds archives → TFRecords (errors and manifest are added by the caller).

  `paths` are the inputs matched at launch (`inputs.match_inputs`).

  Returns the dict of ReadImages' PCollections plus "tfrecord_files" and
  "counts", for `_finish_preprocess` or the `run` command to complete.
  """
  size = image_size or opts.image_size
  limits = PreprocessLimits(
      size, opts.max_pixels,
      archives.Limits(opts.max_member_bytes, opts.max_compression_ratio,
                      opts.max_members_per_archive),
      opts.zip_chunk_size)
  read = p | "ReadImages" >> ReadImages(paths, limits, run_id)
  read["tfrecord_files"] = read["examples"] | "WriteExamples" >> (
      outputs.WriteExamples(opts.output, opts.max_records_per_shard))
  read["counts"] = {
      "members_seen": read["members_seen"],
      "images_written": outputs.count(read["examples"], "CountImages"),
      "masks_skipped": outputs.count(read["masks"], "CountMasks"),
      schemas.COUNT_INPUTS_VANISHED: inputs.count_vanished(read["errors"]),
  }
  return read


def _finish_preprocess(p, opts, read, run_id, started, command, paths):
  errors_written = read["errors"] | "WriteErrors" >> outputs.WriteTable(
      opts.output, schemas.ERRORS_DIR, schemas.errors_schema())
  counts = dict(read["counts"])
  counts["errors"] = outputs.count(read["errors"], "CountErrors")
  p | "Manifest" >> outputs.WriteManifest(
      opts.output,
      manifest_base(command, opts, run_id, opts.image_size, paths),
      started, counts,
      {"tfrecords": read["tfrecord_files"], "errors": errors_written})


class Job(NamedTuple):
  """A built, not yet run, pipeline and what it was built from."""
  pipeline: beam.Pipeline
  command: str
  options: opts_lib.BusiOptions
  run_id: str


def create(argv: Optional[List[str]] = None,
           test_pipeline: Optional[beam.Pipeline] = None) -> Job:
  """Parses and validates flags, prepares the output, builds the pipeline.

  Args:
    argv: command and flags; Beam flags pass through.
    test_pipeline: a TestPipeline to build into instead of a new Pipeline.

  Raises:
    ValueError: bad flags, missing inputs, an unusable model artifact, an
      output directory holding a completed run (without --overwrite) or
      one of the inputs (outputs.OutputDirInUse).
    failures.OutputNotWritable: the output refused a probe write.
  """
  command, flags = opts_lib.split_command(argv)
  opts_lib.refuse_unknown_flags(flags)
  gcs.configure_for_emulator()
  options = PipelineOptions(flags)
  opts = opts_lib.validate(command, options)
  # Matched once, here: every path in this list ends as members or an error
  # row, even if it is gone by the time a worker reads it.
  paths = inputs.match_inputs(opts.input)
  run_id = outputs.new_run_id()
  started = time.time()
  if test_pipeline is not None:
    p = test_pipeline
  else:
    options.view_as(StandardOptions).runner = opts_lib.in_process_runner(
        options)
    p = beam.Pipeline(options=options)

  config = None
  if command != opts_lib.PREPROCESS:
    from beam_pipeline import scoring_pipeline  # pylint: disable=import-outside-toplevel
    # The artifact is checked before the output is touched or a file read.
    config = scoring_pipeline.load_config(opts, run_id, command)
  outputs.prepare_output_dir(opts.output, opts.overwrite, opts.input, paths)
  if config is None:
    read = build_preprocess(p, opts, run_id, paths)
    _finish_preprocess(p, opts, read, run_id, started, command, paths)
  else:
    scoring_pipeline.build(command, p, opts, config, started, paths)
  return Job(p, command, opts, run_id)


def execute(job: Job) -> Dict:
  """Runs a built job to the end and reads its manifest back.

  Returns:
    The manifest of the run, or, for a run that wrote none (e.g. a Dataflow
    `--dry_run`), its id and state.
  """
  result = job.pipeline.run()
  result.wait_until_finish()
  manifest_uri = outputs.join(job.options.output, schemas.MANIFEST_FILE)
  if not FileSystems.exists(manifest_uri):
    return {"run_id": job.run_id, "command": job.command,
            "state": str(result.state)}
  _LOG.info("Run %s finished", job.run_id)
  return outputs.read_json(manifest_uri)


def run(argv: Optional[List[str]] = None,
        test_pipeline: Optional[beam.Pipeline] = None) -> Dict:
  """Entry point of `python -m beam_pipeline COMMAND FLAGS`: create, execute.

  Args:
    argv: command and flags; Beam flags pass through.
    test_pipeline: a TestPipeline to build into instead of a new Pipeline.

  Returns:
    The manifest of the run (read back from the output directory), or, for a
    run that wrote none (e.g. a Dataflow `--dry_run`), its id and state.
  """
  return execute(create(argv, test_pipeline))
