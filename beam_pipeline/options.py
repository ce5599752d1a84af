"""Command-line flags of the pipeline, as a PipelineOptions subclass.

Beam's own flags (`--runner`, `--direct_num_workers`, `--project`, ...) pass
through untouched; `validate` checks the combinations a command needs before
any pipeline is built, with messages that say what to pass instead.
"""

import argparse
import os
from typing import List, NamedTuple, Optional, Sequence, Tuple

from apache_beam.options.pipeline_options import (DebugOptions,
                                                  GoogleCloudOptions,
                                                  PipelineOptions,
                                                  SetupOptions,
                                                  StandardOptions,
                                                  WorkerOptions)

import schemas
from busi_core import archives, imaging, pseudonyms, quality, spelling

PREPROCESS = schemas.COMMAND_PREPROCESS
SCORE = schemas.COMMAND_SCORE
RUN = schemas.COMMAND_RUN
COMMANDS = schemas.COMMANDS

# The project flags each command takes (Beam's own flags pass through).
_READ_FLAGS = ("input", "output", "overwrite", "lock_stale_after_s")
_ARCHIVE_FLAGS = ("image_size", "max_pixels", "max_member_bytes",
                  "max_compression_ratio", "max_members_per_archive",
                  "zip_chunk_size", "max_records_per_shard",
                  "max_frames_per_file", "study_hmac_key")
# Thresholds of the image-quality flags: `--quality_<field>` for each field
# of quality.QualityThresholds.
_QUALITY_PREFIX = "quality_"
_QUALITY_FLAGS = tuple(_QUALITY_PREFIX + field
                       for field in quality.QualityThresholds._fields)
_MODEL_FLAGS = ("model", "threshold", "ood_threshold", "batch_size",
                "inference_accelerator", "model_copies", "inference_precision",
                "gradcam")
# Incremental scoring (beam_pipeline.skip_scored).
_SKIP_FLAGS = ("skip_scored",)
COMMAND_FLAGS = {
    PREPROCESS: _READ_FLAGS + _ARCHIVE_FLAGS + _QUALITY_FLAGS,
    SCORE: _READ_FLAGS + _MODEL_FLAGS + _SKIP_FLAGS,
    RUN: (_READ_FLAGS + _ARCHIVE_FLAGS + _QUALITY_FLAGS + _MODEL_FLAGS
          + _SKIP_FLAGS),
}

GRADCAM_CHOICES = ("none", "flagged", "malignant", "all")
PRECISIONS = ("float32", "bfloat16", "float16")
# Age after which another host's lock on --output, or any lock on gs://,
# counts as abandoned (beam_pipeline.output_lock).
DEFAULT_LOCK_STALE_AFTER_S = 6 * 3600
# The recipe README's Dataflow section uses: one L4 on a G2 VM.
GPU_RECIPE = ("type:nvidia-l4;count:1;machine_type:g2-standard-4;"
              "install-nvidia-driver")
# Machine families a GPU type can only be attached to (Compute Engine's
# accelerator-optimized series: the GPU comes with the machine type).
_GPU_MACHINE_FAMILY = {
    "nvidia-l4": "g2-",
    "nvidia-tesla-a100": "a2-highgpu-",
    "nvidia-a100-80gb": "a2-ultragpu-",
    "nvidia-h100-80gb": "a3-highgpu-",
    "nvidia-h100-mega-80gb": "a3-megagpu-",
}
# G2 machine types with exactly one L4 (g2-standard-24 has 2, -48 has 4,
# -96 has 8).
_G2_ONE_GPU = ("g2-standard-4", "g2-standard-8", "g2-standard-12",
               "g2-standard-16", "g2-standard-32")
_DRIVER_OPTION = "install-nvidia-driver"
# Google's docs: one SDK process per VM for the whole job (every CPU step
# too, under the GIL); model sharing belongs on the model handler.
SINGLE_SDK_CONTAINER_EXPERIMENT = "no_use_multiple_sdk_containers"
# Images per TFRecord shard: one corrupt file costs at most this many.
DEFAULT_MAX_RECORDS_PER_SHARD = 2000
# The values each quality threshold may take (both ends included); the
# defaults and what they mean are schemas.quality's.
_QUALITY_RANGES = {
    "colour_tolerance": (0, 255),
    "colour_share": (0.0, 1.0),
    "blank_std": (0.0, 128.0),
    "min_contrast": (0, 256),
    "min_side": (0, None),
    "max_aspect_ratio": (1.0, None),
}


class BusiOptions(PipelineOptions):
  """Flags of `python -m beam_pipeline {preprocess,score,run}`."""

  @classmethod
  def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input", action="append", default=None,
        help="Input glob, repeatable. preprocess/run: .zip, .tar, .tar.gz,"
        " .tgz archives or image files; score: TFRecord shards. Local or gs://.")
    parser.add_argument("--output", default=None,
                        help="Output directory (local or gs://).")
    parser.add_argument(
        "--image_size", type=int, default=None,
        help="Height and width images are resized to (preprocess, default"
        f" {schemas.DEFAULT_IMAGE_SIZE}). For run, the model's image size is"
        " used and this must match it if given.")
    parser.add_argument(
        "--max_pixels", type=int, default=imaging.DEFAULT_MAX_PIXELS,
        help="Refuse images whose header declares more pixels than this.")
    parser.add_argument(
        "--max_member_bytes", type=int,
        default=archives.DEFAULT_MAX_MEMBER_BYTES,
        help="Refuse archive members that inflate to more bytes than this.")
    parser.add_argument(
        "--max_compression_ratio", type=float,
        default=archives.DEFAULT_MAX_COMPRESSION_RATIO,
        help="Refuse zip members that inflate past this many times their"
        " compressed size (checked past 1 MiB, while streaming).")
    parser.add_argument(
        "--max_members_per_archive", type=int,
        default=archives.DEFAULT_MAX_MEMBERS,
        help="Refuse archives with more members than this.")
    parser.add_argument(
        "--zip_chunk_size", type=int, default=archives.DEFAULT_ZIP_CHUNK,
        help="Zip members per unit of work spread over workers.")
    parser.add_argument(
        "--max_records_per_shard", type=int,
        default=DEFAULT_MAX_RECORDS_PER_SHARD,
        help="preprocess/run: start a new TFRecord shard after this many"
        " images, so that one corrupt file costs one shard (2,000 images at"
        " 224×224 are about 60 MB grey, 180 MB RGB).")
    parser.add_argument(
        "--max_frames_per_file", type=int, default=None,
        help="preprocess/run: read at most this many frames (the first ones)"
        " of a multi-frame DICOM (default: all); frames left unread are"
        " counted as frames_skipped in the manifest.")
    parser.add_argument(
        "--study_hmac_key", default=None,
        help="preprocess/run: key (16+ characters) of the study_key and"
        f" series_key columns, HMAC-SHA256 of the DICOM Study/Series Instance"
        f" UIDs; default ${pseudonyms.KEY_ENV}, which keeps the key out of"
        " the job's displayed options. Without a key the columns are null.")
    parser.add_argument(
        "--quality_colour_tolerance", type=int,
        default=schemas.DEFAULT_QUALITY_COLOUR_TOLERANCE,
        help=f"preprocess/run, image-quality flag '{schemas.FLAG_COLOUR}':"
        " grey levels by"
        " which a pixel's channels must differ to count as colour (0-255;"
        " above JPEG chroma noise).")
    parser.add_argument(
        "--quality_colour_share", type=float,
        default=schemas.DEFAULT_QUALITY_COLOUR_SHARE,
        help=f"preprocess/run: '{schemas.FLAG_COLOUR}' fires above this"
        " share of colour"
        " pixels (0-1; 1 turns it off): Doppler or elastography overlays,"
        " coloured calipers.")
    parser.add_argument(
        "--quality_blank_std", type=float,
        default=schemas.DEFAULT_QUALITY_BLANK_STD,
        help=f"preprocess/run: '{schemas.FLAG_BLANK}' fires below this"
        " standard deviation of"
        " the grey levels (0-128; 0 turns it off).")
    parser.add_argument(
        "--quality_min_contrast", type=int,
        default=schemas.DEFAULT_QUALITY_MIN_CONTRAST,
        help=f"preprocess/run: '{schemas.FLAG_LOW_CONTRAST}' fires below"
        " this many grey"
        " levels between the 1st and 99th percentiles (0-256; 0 turns it"
        " off).")
    parser.add_argument(
        "--quality_min_side", type=int,
        default=schemas.DEFAULT_QUALITY_MIN_SIDE,
        help=f"preprocess/run: '{schemas.FLAG_TINY}' fires when the"
        " original's shorter side"
        " is below this many pixels (0 turns it off).")
    parser.add_argument(
        "--quality_max_aspect_ratio", type=float,
        default=schemas.DEFAULT_QUALITY_MAX_ASPECT_RATIO,
        help=f"preprocess/run: '{schemas.FLAG_ASPECT_RATIO}' fires when"
        " the original's"
        " longer side is over this many times its shorter one (at least 1).")
    parser.add_argument("--model", default=None,
                        help="Model artifact directory (local or gs://).")
    parser.add_argument(
        "--threshold", type=float, default=None,
        help="Confidence below which a prediction is flagged; default: the"
        " artifact's metadata.json threshold.")
    parser.add_argument(
        "--ood_threshold", type=float, default=None,
        help="OOD score above which an image is out of distribution;"
        " default: the artifact's (metadata.json ood.threshold, chosen in"
        " training so that 99 %% of validation images pass). The artifact"
        " must have an OOD detector.")
    parser.add_argument("--batch_size", type=int, default=32,
                        help="Images per model call.")
    parser.add_argument(
        "--inference_accelerator", default=None,
        help="Beam accelerator resource hint for the inference step only"
        f" (Dataflow right fitting), e.g. '{GPU_RECIPE}': GPU type, count 1,"
        " the machine type the GPU comes with, and the driver. Off by"
        " default.")
    parser.add_argument(
        "--model_copies", type=int, default=None,
        help="Copies of the model per worker VM, shared by all its SDK"
        " processes (Beam's model_copies). Default: 1 on GPU workers (one"
        " model per GPU), otherwise one per SDK process.")
    parser.add_argument(
        "--inference_precision", choices=PRECISIONS, default="float32",
        help="Compute precision of the model call (reduced precision is for"
        " GPUs, and bfloat16 for CPUs with AMX: ~7x float32 on 2 cores;"
        " check the accuracy cost with `python -m bench --model M`).")
    parser.add_argument(
        "--gradcam", choices=GRADCAM_CHOICES, default="none",
        help="Write Grad-CAM overlays for these predictions: flagged (low"
        " confidence, below the threshold; not other review reasons),"
        " malignant (predicted malignant) or all.")
    parser.add_argument(
        "--skip_scored", action="append", default=None,
        metavar="RUN_DIR_GLOB",
        help="score/run: leave out images whose image_id already has a"
        " prediction by the same model version in these earlier runs'"
        " predictions (a glob of their --output directories, local or"
        " gs://; repeatable); they are counted as already_scored.")
    parser.add_argument(
        "--overwrite", action="store_true", default=False,
        help="Replace the outputs of a completed earlier run in --output.")
    parser.add_argument(
        "--lock_stale_after_s", type=float,
        default=DEFAULT_LOCK_STALE_AFTER_S,
        help="Seconds after which the lock of another run on --output is"
        " taken over as abandoned: a lock from another host, or any lock on"
        " gs:// (a lock of this host whose process is gone is taken over at"
        " once).")


def command_parser(command: str, **kwargs) -> argparse.ArgumentParser:
  """A parser holding only the project flags `command` takes (for --help
  and for refusing the others)."""
  every = argparse.ArgumentParser(add_help=False)
  BusiOptions._add_argparse_args(every)  # pylint: disable=protected-access
  parser = argparse.ArgumentParser(allow_abbrev=False, **kwargs)
  wanted = {f"--{name}" for name in COMMAND_FLAGS[command]}
  for action in every._actions:  # pylint: disable=protected-access
    if set(action.option_strings) & wanted:
      parser._add_action(action)  # pylint: disable=protected-access
  return parser


def refuse_flags_of_other_commands(command: str,
                                   flags: Sequence[str]) -> None:
  """Refuses project flags that `command` does not take (`preprocess
  --threshold 0.5` would otherwise be read and ignored).

  Raises:
    ValueError: naming the flag and the commands that take it.
  """
  if command not in COMMANDS:
    return
  known = set(COMMAND_FLAGS[command])
  for arg in flags:
    name = arg.split("=", 1)[0][2:] if arg.startswith("--") else None
    if name and name not in known and any(
        name in names for names in COMMAND_FLAGS.values()):
      takers = [c for c in COMMANDS if name in COMMAND_FLAGS[c]]
      raise ValueError(f"--{name} does not apply to {command} (only to"
                       f" {', '.join(takers)})")


def refuse_unknown_flags(flags: Sequence[str]) -> None:
  """Refuses flags that neither Beam nor this project defines.

  Beam only logs a warning for an unknown flag and runs with the defaults; a
  misspelt `--threshhold 0.5` or `--inference_accelerator` must stop the run
  instead (on a hospital's outputs, a silent default is a wrong result).
  Abbreviations are refused too, as Beam's own parser does. A value its
  flag cannot take (`--image_size abc`, `--gradcam some`) is refused here
  too, in one line: Beam's parser would print its whole usage first.

  Raises:
    ValueError: naming each unknown flag, with the closest known spelling,
      or the flag whose value is refused and why.
  """
  parser = argparse.ArgumentParser(allow_abbrev=False, add_help=False,
                                   exit_on_error=False)
  for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
    cls._add_argparse_args(parser)  # pylint: disable=protected-access
  try:
    _, unknown = parser.parse_known_args(list(flags))
  except argparse.ArgumentError as e:
    # "argument --image_size: invalid int value: 'abc'"
    raise ValueError(str(e)) from e
  if not unknown:
    return
  known = [s for action in parser._actions for s in action.option_strings]  # pylint: disable=protected-access
  problems = []
  for i, arg in enumerate(unknown):
    if not arg.startswith("-"):
      if i == 0 or not unknown[i - 1].startswith("-"):  # not a flag's value
        problems.append(f"unexpected argument {arg!r}")
      continue
    name = arg.split("=", 1)[0]
    problems.append(f"unknown flag {name}" +
                    spelling.did_you_mean(name, known))
  raise ValueError("; ".join(problems))


# Runner names as `runner_name` gives them.
_DATAFLOW_RUNNERS = ("dataflowrunner", "testdataflowrunner")
_DIRECT_RUNNERS = ("directrunner", "switchingdirectrunner")
_LOCAL_RUNNERS = _DIRECT_RUNNERS + (
    "fnapirunner", "bundlebaseddirectrunner", "testdirectrunner")


def runner_name(options: PipelineOptions) -> str:
  """The runner's class name in lower case, read as Beam reads `--runner`:
  in any case, with or without its 'Runner' suffix, or as a dotted path
  (`direct`, `directrunner` and `DirectRunner` are all 'directrunner');
  'directrunner' when none is given."""
  runner = str(options.view_as(StandardOptions).runner or "DirectRunner")
  name = runner.split(".")[-1].lower()
  return name if name.endswith("runner") else name + "runner"


def _require(value, flag: str, command: str) -> None:
  if value in (None, [], ""):
    raise ValueError(f"{command}: {flag} is required")


def _check_dataflow_paths(options: PipelineOptions, opts: BusiOptions
                          ) -> None:
  """Dataflow's workers see gs:// paths only: a local --input, --output,
  --model or --skip_scored is refused before the job is built (else the
  workers fail, or write where nobody looks, after the VMs have started); so
  is a --setup_file that does not exist (Beam's traceback otherwise)."""
  if runner_name(options) not in _DATAFLOW_RUNNERS:
    return
  setup_file = options.view_as(SetupOptions).setup_file
  if setup_file and not os.path.isfile(setup_file):
    raise ValueError(f"--setup_file {setup_file}: no such file (pass the"
                     " project's setup.py, e.g. --setup_file ./setup.py)")
  named = [("--input", value) for value in opts.input or ()]
  named += [("--skip_scored", value) for value in opts.skip_scored or ()]
  named += [(flag, value) for flag, value in (("--output", opts.output),
                                              ("--model", opts.model))
            if value]
  local = [f"{flag} {value}" for flag, value in named
           if not value.startswith("gs://")]
  if local:
    raise ValueError(
        f"{'; '.join(local)}: Dataflow's workers cannot see this machine's"
        " files; pass gs:// paths (copy the archives and the model artifact"
        " to a bucket first, e.g. `gcloud storage cp -r`)")


def validate(command: str, options: PipelineOptions) -> BusiOptions:
  """Checks the flags a command needs; returns the BusiOptions view.

  Raises:
    ValueError: with a message naming the flag and what to pass.
  """
  if command not in COMMANDS:
    raise ValueError(f"unknown command {command!r}; use one of {COMMANDS}")
  opts = options.view_as(BusiOptions)
  _require(opts.input, "--input", command)
  _require(opts.output, "--output", command)
  try:
    opts.output.encode("utf-8")
  except UnicodeEncodeError as e:
    # Beam's sinks write paths as UTF-8 text; fail here, before anything is
    # created, rather than half-way with a codec error.
    raise ValueError(
        f"--output {opts.output.encode('utf-8', 'surrogateescape')!r} is not"
        " valid UTF-8 text; choose an output name that is") from e
  if command in (SCORE, RUN):
    _require(opts.model, "--model", command)
  _check_dataflow_paths(options, opts)
  if command == PREPROCESS and opts.image_size is None:
    opts.image_size = schemas.DEFAULT_IMAGE_SIZE
  if opts.image_size is not None and not 8 <= opts.image_size <= 4096:
    raise ValueError(f"--image_size {opts.image_size} is outside 8..4096")
  if opts.threshold is not None and not 0.0 <= opts.threshold <= 1.0:
    raise ValueError(f"--threshold {opts.threshold} is outside [0, 1]")
  if opts.ood_threshold is not None and not (
      0.0 <= opts.ood_threshold < float("inf")):
    raise ValueError(f"--ood_threshold {opts.ood_threshold} is not a"
                     " non-negative number")
  if not opts.lock_stale_after_s > 0:
    raise ValueError(f"--lock_stale_after_s {opts.lock_stale_after_s} must be"
                     " more than 0")
  if opts.batch_size < 1:
    raise ValueError("--batch_size must be at least 1")
  for name in ("max_pixels", "max_member_bytes", "max_compression_ratio",
               "max_members_per_archive", "zip_chunk_size",
               "max_records_per_shard"):
    if getattr(opts, name) < 1:
      raise ValueError(f"--{name} must be at least 1")
  if opts.max_frames_per_file is not None and opts.max_frames_per_file < 1:
    raise ValueError("--max_frames_per_file must be at least 1 (leave it out"
                     " to read every frame)")
  for field, (low, high) in _QUALITY_RANGES.items():
    value = getattr(opts, _QUALITY_PREFIX + field)
    # Written so that NaN fails too.
    if not (low <= value and (high is None or value <= high)):
      span = f"{low}..{high}" if high is not None else f"at least {low}"
      raise ValueError(f"--{_QUALITY_PREFIX}{field} {value} is outside {span}")
  if opts.model_copies is not None and opts.model_copies < 1:
    raise ValueError("--model_copies must be at least 1")
  if validate_gpu(options) and opts.model_copies is None:
    # One model per GPU, shared by every SDK process of the VM (Beam starts
    # one per vCPU): each loading its own copy would fill the GPU's memory.
    opts.model_copies = 1
  return opts


class Accelerator(NamedTuple):
  """A Dataflow accelerator value: `type:T;count:N;machine_type:M;opt;...`."""
  type: Optional[str]
  count: Optional[int]
  machine_type: Optional[str]
  options: Tuple[str, ...]  # bare words: install-nvidia-driver, ...


def parse_accelerator(value: str, flag: str) -> Accelerator:
  """Parses an accelerator hint or `worker_accelerator` value.

  Raises:
    ValueError: a part that is neither `key:value` nor a bare option, a
      repeated or unknown key, or a count that is not a whole number.
  """
  fields, options = {}, []
  for part in (p.strip() for p in value.split(";")):
    if not part:
      continue
    if ":" not in part:
      options.append(part)
      continue
    key, _, val = part.partition(":")
    if key not in ("type", "count", "machine_type") or key in fields:
      raise ValueError(f"{flag} {value!r}: unexpected {part!r}; write it as"
                       f" {GPU_RECIPE!r}")
    fields[key] = val
  count = fields.get("count")
  if count is not None and not count.isdigit():
    raise ValueError(f"{flag} {value!r}: count {count!r} is not a number")
  return Accelerator(fields.get("type"), None if count is None else int(count),
                     fields.get("machine_type"), tuple(options))


def _check_gpu(acc: Accelerator, machine_type: Optional[str], flag: str,
               value: str, machine_flag: str) -> None:
  """The combinations Dataflow would reject, or that leave a GPU unused."""
  if not acc.type or acc.count is None:
    raise ValueError(f"{flag} {value!r} needs both type: and count:, e.g."
                     f" {GPU_RECIPE!r}")
  if acc.count != 1:
    raise ValueError(
        f"{flag} {value!r}: use count:1. The model handler keeps one model"
        " per worker VM (--model_copies), which TensorFlow places on the"
        " first GPU: further GPUs would be paid for and sit idle.")
  if _DRIVER_OPTION not in acc.options:
    raise ValueError(
        f"{flag} {value!r} lacks {_DRIVER_OPTION}: without it Dataflow"
        " installs no NVIDIA driver and TensorFlow silently runs on the CPU")
  family = _GPU_MACHINE_FAMILY.get(acc.type)
  if family is None:
    # N1 GPUs (T4, V100, P100, P4) attach to N1 machines of any size.
    if machine_type and not machine_type.startswith("n1-"):
      raise ValueError(f"{acc.type} GPUs attach to N1 machine types only,"
                       f" not {machine_type} ({machine_flag})")
    return
  if not machine_type:
    raise ValueError(
        f"{flag} {value!r}: {acc.type} GPUs come only with {family}* machine"
        f" types; add {machine_flag} (e.g. {GPU_RECIPE!r})")
  if not machine_type.startswith(family):
    raise ValueError(f"{machine_flag} {machine_type} cannot carry {acc.type}"
                     f" GPUs; use a {family}* machine type")
  if family == "g2-" and machine_type not in _G2_ONE_GPU:
    raise ValueError(f"{machine_type} comes with more than one L4; use one of"
                     f" {', '.join(_G2_ONE_GPU)} ({machine_flag})")


def validate_gpu(options: PipelineOptions) -> bool:
  """Checks the job's GPU request; returns whether workers get GPUs.

  Two ways to ask, as Dataflow documents them: `--inference_accelerator`
  (a resource hint on the inference step; its machine type goes in the hint,
  `machine_type:g2-standard-4`) or `--dataflow_service_options
  worker_accelerator=...` (every worker; `--machine_type g2-standard-4`).

  Raises:
    ValueError: both at once, a hint without the machine type its GPU needs,
      a count other than 1, no driver, or the job-wide single-SDK-process
      experiment (use --model_copies instead).
  """
  opts = options.view_as(BusiOptions)
  service_options = options.view_as(
      GoogleCloudOptions).dataflow_service_options or []
  worker = [o.partition("=")[2] for o in service_options
            if o.startswith("worker_accelerator")]
  if opts.inference_accelerator and worker:
    raise ValueError(
        "--inference_accelerator (GPU for the inference step only, Dataflow"
        " right fitting) cannot be combined with --dataflow_service_options="
        "worker_accelerator=... (GPU on every worker); Dataflow documents them"
        " as exclusive. Pass one of the two.")
  if opts.inference_accelerator:
    hint = opts.inference_accelerator
    acc = parse_accelerator(hint, "--inference_accelerator")
    _check_gpu(acc, acc.machine_type, "--inference_accelerator", hint,
               "machine_type:... in the hint")
  elif worker:
    acc = parse_accelerator(worker[0], "worker_accelerator")
    if acc.machine_type:
      raise ValueError("worker_accelerator takes no machine_type; pass"
                       f" --machine_type {acc.machine_type} instead")
    _check_gpu(acc, options.view_as(WorkerOptions).machine_type,
               "worker_accelerator", worker[0], "--machine_type")
  else:
    return False
  experiments = options.view_as(DebugOptions).experiments or []
  if SINGLE_SDK_CONTAINER_EXPERIMENT in experiments:
    raise ValueError(
        f"--experiments {SINGLE_SDK_CONTAINER_EXPERIMENT} runs one SDK process"
        " per VM for the whole job (every step then shares one GIL); leave it"
        " out: the model handler already keeps one model per GPU"
        " (--model_copies, default 1 on GPU workers)")
  return True


def take_study_hmac_key(opts: BusiOptions) -> Optional[bytes]:
  """The study/series HMAC key (flag, else environment), or None.

  The flag's value is blanked in the options once read, so that the key is
  not among the options a Dataflow job displays; it reaches the workers
  inside the decoding step instead.

  Raises:
    ValueError: the key is too short (the message does not quote it).
  """
  key = pseudonyms.resolve_key(opts.study_hmac_key)
  opts.study_hmac_key = None
  return key


def quality_thresholds(opts: BusiOptions) -> quality.QualityThresholds:
  """The image-quality thresholds the `--quality_*` flags set."""
  return quality.QualityThresholds(**{
      field: getattr(opts, _QUALITY_PREFIX + field)
      for field in quality.QualityThresholds._fields})


def is_local_runner(options: PipelineOptions) -> bool:
  return runner_name(options) in _LOCAL_RUNNERS


def in_process_runner(options: PipelineOptions) -> Optional[str]:
  """The runner to use for a local run: Beam's in-process FnApiRunner.

  Beam 2.77's DirectRunner first tries the Prism runner, which downloads a
  binary from the internet; local runs here must not. The FnApiRunner is what
  the DirectRunner falls back to, and honours --direct_num_workers and
  --direct_running_mode.
  """
  if runner_name(options) in _DIRECT_RUNNERS:
    return "FnApiRunner"
  return options.view_as(StandardOptions).runner


def split_command(argv: Optional[List[str]]) -> tuple:
  """Splits `COMMAND FLAGS...` into the command and the flags."""
  if not argv or argv[0].startswith("-"):
    raise ValueError(f"usage: python -m beam_pipeline {{{','.join(COMMANDS)}}}"
                     " --input ... --output ... [flags]")
  return argv[0], list(argv[1:])
