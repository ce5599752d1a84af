"""The one composer of every job: `build` only adds steps; `create` parses
flags, checks the model and the output, and builds; `run` runs."""

import contextlib
import logging
import time
from typing import Dict, List, NamedTuple, Optional, Sequence, TextIO

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import (DirectOptions,
                                                  PipelineOptions,
                                                  StandardOptions, TestOptions)
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.runners.runner import PipelineState

import schemas
from beam_pipeline import options as opts_lib
from beam_pipeline import (inputs, output_lock, outputs, progress, scoring,
                           scoring_pipeline, skip_scored)
from beam_pipeline.preprocess import DicomSettings, PreprocessLimits, ReadImages
from busi_core import archives, gcs

_LOG = logging.getLogger(__name__)


class Plan(NamedTuple):
  """What `build` composes: the command, its flags and what launch found."""
  command: str
  options: opts_lib.BusiOptions
  paths: Sequence[str]  # the inputs matched at launch (inputs.match_inputs)
  run_id: str
  started: float  # time.time() at launch
  scoring: Optional[scoring.ScoringConfig]  # None for preprocess
  # HMAC key of the DICOM study/series pseudonyms (options.take_study_hmac_key)
  study_hmac_key: Optional[bytes] = None
  # --skip_scored's earlier runs, matched at launch; None without the flag.
  skip: Optional[skip_scored.ScoredRuns] = None


def manifest_base(plan: Plan, image_size: int) -> Dict:
  """The manifest's fixed fields, known before the run."""
  opts = plan.options
  base = {
      schemas.MANIFEST_RUN_ID: plan.run_id,
      schemas.MANIFEST_COMMAND: plan.command,
      schemas.MANIFEST_INPUTS: [archives.display_uri(pattern)
                                for pattern in opts.input],
      schemas.MANIFEST_INPUTS_MATCHED: len(plan.paths),
      schemas.MANIFEST_OUTPUT: opts.output,
      schemas.MANIFEST_IMAGE_SIZE: image_size,
      schemas.MANIFEST_FORMAT_VERSION: schemas.FORMAT_VERSION,
      schemas.MANIFEST_PACKAGE_VERSION: schemas.PACKAGE_VERSION,
      schemas.MANIFEST_STARTED_AT: outputs.utc_now_iso(),
  }
  if plan.scoring is not None:
    config = plan.scoring
    base.update({schemas.MANIFEST_MODEL: opts.model,
                 schemas.MANIFEST_MODEL_VERSION: config.model_version,
                 schemas.MANIFEST_THRESHOLD: config.threshold,
                 # null: the model has no OOD detector (columns null too)
                 schemas.MANIFEST_OOD_THRESHOLD: config.ood_threshold,
                 schemas.MANIFEST_LABELS: list(config.labels),
                 schemas.MANIFEST_BATCH_SIZE: opts.batch_size,
                 # null: the artifact predates train's checks
                 schemas.MANIFEST_MODEL_WARNINGS: _listed(
                     config.model_warnings),
                 # null: not recalibrated, or before recalibrate's check
                 schemas.MANIFEST_MODEL_RECALIBRATION_WARNINGS: _listed(
                     config.model_recalibration_warnings)})
    if config.expected_flag_rates is not None:
      # What the run's flagged shares are checked against; the finished
      # manifest holds the check (outputs.finish_manifest).
      base[schemas.MANIFEST_FLAG_RATES] = config.expected_flag_rates
  if plan.skip is not None:
    base[schemas.MANIFEST_SKIP_SCORED] = plan.skip.manifest_field()
  return base


def _listed(warnings: Optional[Sequence[str]]) -> Optional[List[str]]:
  """A model's warnings for the manifest: null where none were checked."""
  return None if warnings is None else list(warnings)


def _read_archives(p: beam.Pipeline, plan: Plan, image_size: int,
                   counts: Dict, written: Dict):
  """Archives → Examples written as TFRecords; returns ReadImages' dict."""
  opts = plan.options
  limits = PreprocessLimits(
      image_size, opts.max_pixels,
      archives.Limits(opts.max_member_bytes, opts.max_compression_ratio,
                      opts.max_members_per_archive),
      opts.zip_chunk_size, opts_lib.quality_thresholds(opts),
      DicomSettings(opts.max_frames_per_file, plan.study_hmac_key))
  read = p | "ReadImages" >> ReadImages(plan.paths, limits, plan.run_id)
  written["tfrecords"] = read["examples"] | "WriteExamples" >> (
      outputs.WriteExamples(opts.output, opts.max_records_per_shard))
  counts.update({
      schemas.COUNT_MEMBERS_SEEN: read["members_seen"],
      schemas.COUNT_IMAGES_WRITTEN: outputs.count(read["examples"],
                                                  "CountImages"),
      schemas.COUNT_MASKS_SKIPPED: outputs.count(read["masks"], "CountMasks"),
      schemas.COUNT_EXTRA_FRAMES: read["extra_frames"],
      schemas.COUNT_FRAMES_SKIPPED: read["frames_skipped"],
      schemas.COUNT_INPUTS_VANISHED: inputs.count_vanished(read["errors"]),
  })
  return read


def _read_shards(p: beam.Pipeline, plan: Plan, counts: Dict):
  """TFRecord shards → ImageRecords; returns ReadTFRecords' dict."""
  read = p | "ReadTFRecords" >> scoring_pipeline.ReadTFRecords(
      plan.paths, plan.run_id)
  counts.update({
      schemas.COUNT_MEMBERS_SEEN: read["members_seen"],
      schemas.COUNT_SHARDS_UNREAD: read["shards_unread"],
      schemas.COUNT_INPUTS_VANISHED: inputs.count_vanished(read["errors"]),
      schemas.COUNT_MASKS_SKIPPED: outputs.count(
          p | "NoMasks" >> beam.Create([]), "CountMasks"),
  })
  return read


def _score(images, plan: Plan, counts: Dict, written: Dict, extra: Dict):
  """ImageRecords → predictions written; returns ScoreImages' dict."""
  opts, config = plan.options, plan.scoring
  scored = images | "ScoreImages" >> scoring_pipeline.ScoreImages(
      opts.model, config, opts.batch_size, opts.inference_accelerator,
      opts.inference_precision, opts.gradcam, opts.output,
      model_copies=opts.model_copies)
  rows = scored["rows"]
  written["predictions"] = rows | "WritePredictions" >> outputs.WriteTable(
      opts.output, schemas.PREDICTIONS_DIR,
      schemas.predictions_schema(config.labels))
  counts[schemas.COUNT_PREDICTIONS] = outputs.count(rows, "CountPredictions")
  for name, label, predicate in (
      (schemas.COUNT_LOW_CONFIDENCE, "LowConfidence",
       scoring.is_low_confidence),
      (schemas.COUNT_OUT_OF_DISTRIBUTION, "OutOfDistribution",
       scoring.is_out_of_distribution),
      (schemas.COUNT_NEEDS_REVIEW, "NeedsReview", scoring.needs_review)):
    counts[name] = outputs.count(rows | label >> beam.Filter(predicate),
                                 f"Count{label}")
  extra[schemas.MANIFEST_QUALITY_FLAGS] = (
      rows
      | "QualityFlags" >> beam.FlatMap(scoring.quality_flag_names)
      | "CountPerFlag" >> beam.combiners.Count.PerElement()
      | "FlagDict" >> beam.combiners.ToDict())
  # In the errors table (stage "gradcam") but outside the invariant: those
  # images have their prediction row.
  counts[schemas.COUNT_GRADCAM_FAILURES] = outputs.count(
      scored["gradcam_errors"], "CountGradCamFailures")
  extra[schemas.MANIFEST_PREDICTED_CLASSES] = (
      rows
      | "PredictedClass" >> beam.Map(scoring.predicted_class)
      | "CountPerClass" >> beam.combiners.Count.PerElement()
      | "ClassDict" >> beam.combiners.ToDict())
  return scored


def build(p: beam.Pipeline, plan: Plan) -> None:
  """Adds every step of a preprocess, score or run job to `p`.

  Read (archives or TFRecord shards), score when there is a model, then the
  errors table and, last, the manifest with its counts.
  """
  counts, written, extra = {}, {}, {}
  config = plan.scoring
  image_size = config.image_size if config else plan.options.image_size
  if plan.command == opts_lib.SCORE:
    read = _read_shards(p, plan, counts)
    images = read["images"]
  else:
    read = _read_archives(p, plan, image_size, counts, written)
    images = read["examples"]
    if config is not None:
      images = images | "ParseExamples" >> beam.Map(
          scoring.parse_for_scoring)
  if config is None:
    errors = error_table = read["errors"]
  else:
    if plan.skip is not None:
      skipped = images | "SkipScored" >> skip_scored.SkipScored(
          plan.skip.files, config.model_version)
      images = skipped["images"]
      counts[schemas.COUNT_ALREADY_SCORED] = skipped["already_scored"]
    scored = _score(images, plan, counts, written, extra)
    errors = (read["errors"], scored["errors"]) | "AllErrors" >> (
        beam.Flatten())
    error_table = (errors, scored["gradcam_errors"]) | "ErrorTable" >> (
        beam.Flatten())
  written["errors"] = error_table | "WriteErrors" >> outputs.WriteTable(
      plan.options.output, schemas.ERRORS_DIR, schemas.errors_schema())
  counts[schemas.COUNT_ERRORS] = outputs.count(errors, "CountErrors")
  p | "Manifest" >> outputs.WriteManifest(
      plan.options.output, manifest_base(plan, image_size), plan.started,
      counts, written, extra=extra)


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
    ValueError: bad flags, missing inputs, an unusable model artifact, a
      --skip_scored glob naming no finished run with predictions, an
      output directory holding a completed run (without --overwrite) or
      one of the inputs (outputs.OutputDirInUse), or claimed by another
      live run (output_lock.OutputLocked).
    failures.OutputNotWritable: the output refused a probe write.
  """
  command, flags = opts_lib.split_command(argv)
  opts_lib.refuse_unknown_flags(flags)
  opts_lib.refuse_flags_of_other_commands(command, flags)
  gcs.configure_for_emulator()
  options = PipelineOptions(flags)
  opts = opts_lib.validate(command, options)
  study_hmac_key = (opts_lib.take_study_hmac_key(opts)
                    if command != opts_lib.SCORE else None)
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
    # The artifact is checked before the output is touched or a file read.
    config = scoring_pipeline.load_config(opts, run_id, command)
    if command == opts_lib.SCORE:
      scoring_pipeline.check_image_size(paths, config.image_size)
  skip = None
  if opts.skip_scored:
    skip = skip_scored.find_runs(opts.skip_scored, opts.output,
                                 config.model_version)
  _claim_and_build(p, Plan(command, opts, paths, run_id, started, config,
                           study_hmac_key, skip), options)
  return Job(p, command, opts, run_id)


def _in_process(options: PipelineOptions) -> bool:
  return opts_lib.is_local_runner(options)


def _claim_and_build(p: beam.Pipeline, plan: Plan,
                     options: PipelineOptions) -> None:
  """Claims --output (output_lock) before anything in it is deleted, then
  prepares it and builds; the claim is given back if either fails, and at
  once for a Dataflow --dry_run, which writes nothing."""
  opts = plan.options
  outputs.check_is_directory(opts.output)
  outputs.check_inputs_apart(opts.output, opts.input, plan.paths)
  try:
    output_lock.claim(opts.output, plan.run_id, opts.lock_stale_after_s,
                      in_process=_in_process(options))
  except OSError as e:
    raise outputs.not_writable(opts.output, e) from e
  try:
    outputs.prepare_output_dir(opts.output, opts.overwrite, opts.input,
                               plan.paths)
    build(p, plan)
  except BaseException:
    output_lock.release(opts.output, plan.run_id)
    raise
  # As Beam's Dataflow runner reads it: any value given means a dry run.
  if options.view_as(TestOptions).dry_run:
    output_lock.release(opts.output, plan.run_id)


def _progress(job: Job, stream: Optional[TextIO],
              every_s: Optional[float]):
  """The progress line's reporter where one can be shown, else a no-op.

  Only a run in this process has one: workers of another process (Dataflow,
  whose UI shows the counters live, or the FnApiRunner's multi_processing
  mode) update a tally nobody here reads (see `progress`).
  """
  if stream is None or not isinstance(job.pipeline.runner, FnApiRunner):
    return contextlib.nullcontext()
  mode = job.options.view_as(DirectOptions).direct_running_mode
  if mode == "multi_processing":
    _LOG.info("No progress line with --direct_running_mode multi_processing;"
              " the counters are shown at the end")
    return contextlib.nullcontext()
  if job.command == opts_lib.PREPROCESS:
    verb, images = "preprocessed", schemas.COUNTER_IMAGES_DECODED
  else:
    verb, images = "scored", schemas.COUNTER_PREDICTIONS
  return progress.Reporter(
      stream, verb, images,
      progress.every_s(stream) if every_s is None else every_s)


def execute(job: Job, progress_to: Optional[TextIO] = None,
            progress_every_s: Optional[float] = None) -> Dict:
  """Runs a built job to the end and reads its manifest back.

  Args:
    job: from `create`.
    progress_to: where a local run prints its progress line (see
      `progress.Reporter`); None: nowhere.
    progress_every_s: seconds between progress lines; None: as suits the
      stream (`progress.every_s`).

  Returns:
    The manifest of the run, with the job's committed Beam counters under
    schemas.EXECUTE_COUNTERS, or, for a run that wrote none (e.g. a
    Dataflow `--dry_run`), its id, command and state (EXECUTE_STATE).
  """
  result = None
  try:
    with _progress(job, progress_to, progress_every_s):
      result = job.pipeline.run()
      result.wait_until_finish()
  except BaseException:
    # The run's lock goes with it, unless the job may still be running
    # elsewhere (a Dataflow job outlives its launcher's Ctrl-C).
    if (_in_process(job.options) or result is None or
        PipelineState.is_terminal(result.state)):
      output_lock.release(job.options.output, job.run_id)
    raise
  manifest_uri = outputs.join(job.options.output, schemas.MANIFEST_FILE)
  if not FileSystems.exists(manifest_uri):
    if PipelineState.is_terminal(result.state):
      output_lock.release(job.options.output, job.run_id)
    return {schemas.MANIFEST_RUN_ID: job.run_id,
            schemas.MANIFEST_COMMAND: job.command,
            schemas.EXECUTE_STATE: str(result.state)}
  _LOG.info("Run %s finished", job.run_id)
  manifest = outputs.read_json(manifest_uri)
  try:
    manifest[schemas.EXECUTE_COUNTERS] = progress.committed_counters(result)
  except Exception:  # pylint: disable=broad-except
    # A finished run stands on its manifest; the counters only add to the
    # summary (a runner's metrics service can fail or lack them).
    _LOG.warning("The run's Beam counters could not be read", exc_info=True)
  return manifest


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
