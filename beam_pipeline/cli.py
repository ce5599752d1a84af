"""Command-line front end: runs a command and prints the run's summary.

Failures a person can act on (bad flags, a refused output, a full or
read-only disk, Ctrl-C) end in one line on stderr saying what happened and
what to do, and an exit status of their own; `--verbose` adds Beam's
messages and the tracebacks.
"""

import argparse
import io
import json
import logging
import os
import shlex
import signal
import sys
import threading
from typing import List, NoReturn, Optional

import schemas
from beam_pipeline import failures, output_lock, outputs
from busi_core import artifact, flag_rates, output_dirs, spelling

_LOG = logging.getLogger(__name__)

# Exit statuses, documented in the README ("Exit status").
EXIT_OK = 0
EXIT_ERROR = 1  # anything else: a bug, or a failure not listed here
EXIT_USAGE = 2  # bad flags, an output refused, an input that matches nothing
EXIT_INVARIANT = 3  # the manifest's member invariant does not hold
EXIT_IO = 4  # no space left, read-only or unwritable output, ...
EXIT_INCOMPLETE = 5  # finished, but inputs promised more than could be read
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT)

VERBOSE_FLAG = "--verbose"
_PIPELINE_COMMANDS = schemas.COMMANDS
_REPORTING_COMMANDS = ("summary", "report", "compare")
INTERRUPTED = ("interrupted: the run was stopped before it finished; rerun the"
               " same command; the unfinished output is removed on rerun")
# Loggers whose INFO messages a person reads; other libraries' show from
# WARNING (all of them with --verbose).
_OWN_LOGGERS = ("beam_pipeline", "training", "schemas")


def exit_status(manifest: dict) -> int:
  """The exit status a finished run's manifest calls for."""
  if not manifest[schemas.MANIFEST_INVARIANT][schemas.INVARIANT_HOLDS]:
    return EXIT_INVARIANT
  if not manifest.get(schemas.MANIFEST_COMPLETE, True):
    return EXIT_INCOMPLETE
  return EXIT_OK


def _aligned(pairs, indent: str, least: int) -> list:
  """`name value` lines with the values in one column, however long a name
  (quality flag counters such as quality_burned_in_annotation are long)."""
  pairs = list(pairs)
  width = max([least] + [len(str(name)) for name, _ in pairs])
  return [f"{indent}{name:<{width}} {value}" for name, value in pairs]


def format_summary(manifest: dict) -> str:
  """The end-of-run summary a person reads."""
  counts = manifest.get(schemas.MANIFEST_COUNTS, {})
  lines = [f"Run {manifest.get(schemas.MANIFEST_RUN_ID)}"
           f" ({manifest.get(schemas.MANIFEST_COMMAND)})"
           f" finished in {manifest.get(schemas.MANIFEST_WALL_TIME_S)} s"]
  lines += _aligned(counts.items(), "  ", 22)
  per_class = manifest.get(schemas.MANIFEST_PREDICTED_CLASSES)
  if per_class:
    lines.append("  predicted classes:")
    lines += _aligned(per_class.items(), "    ", 20)
  if schemas.MANIFEST_THROUGHPUT in manifest:
    throughput = manifest[schemas.MANIFEST_THROUGHPUT]
    lines += _aligned([("throughput", f"{throughput} images/s")], "  ", 22)
  invariant = manifest.get(schemas.MANIFEST_INVARIANT, {})
  holds = invariant.get(schemas.INVARIANT_HOLDS)
  lines.append(f"  {invariant.get(schemas.INVARIANT_RULE)}: "
               f"{'holds' if holds else 'BROKEN'}")
  lost = manifest.get(schemas.MANIFEST_INCOMPLETE_BECAUSE) or {}
  for name, value in lost.items():
    lines.append(f"  INCOMPLETE: {name} = {value} (see the errors table)")
  for line in flag_rates.warnings(manifest.get(schemas.MANIFEST_FLAG_RATES)):
    lines.append(f"  WARNING: {line}")
  for line in artifact.run_warning_lines(manifest):
    lines.append(f"  WARNING: {line}")
  lines.append(f"  outputs in {manifest.get(schemas.MANIFEST_OUTPUT)}")
  counters = manifest.get(schemas.EXECUTE_COUNTERS)
  if counters:
    lines.append("  Beam counters (committed):")
    lines += _aligned(counters.items(), "    ", 20)
  return "\n".join(lines)


# The error types the end-of-run summary shows, and an example's length.
ERROR_TYPES_SHOWN = 3
ERROR_EXAMPLE_CHARS = 240


def error_lines(manifest: dict) -> List[str]:
  """A local run with errors: its commonest error types, each with how many
  members and one message (the errors table's own query, as `summary`
  shows every type), so that the console says why without a query. []
  without errors, for gs:// output, or when the table cannot be read."""
  output = manifest.get(schemas.MANIFEST_OUTPUT) or ""
  if not manifest.get(schemas.MANIFEST_COUNTS, {}).get(
      schemas.COUNT_ERRORS) or "://" in output:
    return []
  from reporting import sql  # pylint: disable=import-outside-toplevel
  try:
    run = sql.connect(output)
    rows = (run.con.execute(sql.ERRORS_BY_TYPE).fetchall()
            if run.has_errors else [])
  except Exception:  # pylint: disable=broad-except
    _LOG.debug("The errors table was not read", exc_info=True)
    return []
  if not rows:
    return []
  which = ("all" if len(rows) <= ERROR_TYPES_SHOWN else
           f"the {ERROR_TYPES_SHOWN} commonest of {len(rows)}")
  # `summary` reads scored runs only; a preprocess run has its table.
  preprocess = (manifest.get(schemas.MANIFEST_COMMAND) ==
                schemas.COMMAND_PREPROCESS)
  where = (f"the errors table, {sql.errors_glob(output)}," if preprocess else
           "`python -m beam_pipeline summary --output"
           f" {shlex.quote(output)}`")
  lines = [f"  errors by type ({which}; {where} lists each):"]
  for stage, error_type, members, example in rows[:ERROR_TYPES_SHOWN]:
    text = " ".join(str(example or "").split())
    if len(text) > ERROR_EXAMPLE_CHARS:
      text = text[:ERROR_EXAMPLE_CHARS - 3] + "..."
    lines.append(f"    {stage} {error_type}: {members}, e.g. {text}")
  return lines


USAGE = "python -m beam_pipeline [--version] COMMAND [flags] [Beam flags]"
_COMMANDS = {
    "preprocess": "archives / images → DIR/tfrecords, DIR/errors, "
                  "DIR/manifest.json",
    "score": "TFRecords → DIR/predictions, DIR/errors (needs --model)",
    "run": "archives → TFRecords and predictions in one job (needs --model)",
    "summary": "DuckDB SQL summary of a run: summary --output DIR",
    "report": "HTML run report: report --predictions DIR --output REPORT_DIR",
    "compare": "how two runs agree (class flips, confidence, flags): compare"
               " --old RUN --new RUN --output DIR",
    "doctor": "TensorFlow build, CUDA/cuDNN, devices; with --model DIR, load"
              " the model and time it (run it first inside a worker image)",
}
_EPILOG = ("--verbose shows Beam's own messages and full tracebacks of"
           " failures. Beam's own flags (--runner, --direct_num_workers,"
           " --project, ...) pass through. Exit statuses: see README.md.")


class _HelpFormatter(argparse.HelpFormatter):
  """Shows a flag's default where it has one worth showing (no
  `(default: None)` noise)."""

  def _get_help_string(self, action: argparse.Action) -> str:
    text = action.help or ""
    if (action.default not in (None, False, argparse.SUPPRESS) and
        "%(default)" not in text and action.option_strings):
      text += " (default: %(default)s)"
    return text


def print_help(command: Optional[str] = None) -> None:
  """The commands, or one pipeline command's own flags with defaults."""
  from beam_pipeline import options as opts_lib  # pylint: disable=import-outside-toplevel
  if command in opts_lib.COMMANDS:
    parser = opts_lib.command_parser(
        command, prog=f"python -m beam_pipeline {command}",
        description=_COMMANDS[command], epilog=_EPILOG,
        formatter_class=_HelpFormatter)
    parser.print_help()
    return
  parser = argparse.ArgumentParser(prog="python -m beam_pipeline",
                                   usage=USAGE, epilog=_EPILOG)
  parser.add_argument("--version", action="store_true",
                      help="print the package version and exit")
  commands = parser.add_subparsers(title="commands", metavar="COMMAND")
  for name, text in _COMMANDS.items():
    commands.add_parser(name, help=text)
  parser.print_help()


def unknown_command(word: str) -> str:
  """One line for a first argument that is no command: the closest command,
  and every command (pipeline, reporting and doctor alike)."""
  what = (f"no command before {word}" if word.startswith("-") else
          f"unknown command {word!r}" +
          spelling.did_you_mean(word, _COMMANDS))
  return (f"{what}; the first argument is one of {', '.join(_COMMANDS)}"
          " (python -m beam_pipeline --help)")


def version() -> str:
  import schemas  # pylint: disable=import-outside-toplevel
  return (f"busi-scoring {schemas.PACKAGE_VERSION} (TFRecord format"
          f" {schemas.FORMAT_VERSION}, artifact format"
          f" {schemas.ARTIFACT_FORMAT_VERSION})")


_BEAM_RESOURCE_WARNING = (
    "Resource module is not available for current platform")


class _ConsoleFilter(logging.Filter):
  """Our messages from INFO, other libraries' from WARNING.

  Beam's runner logs a failed step at ERROR with its traceback before
  raising it; the launcher reports that failure itself, in one line.
  RunInference's "Resource module is not available" warning is dropped:
  Beam 2.77 sets `resource` to None whenever its optional PyTorch model
  manager fails to import (apache_beam/ml/inference/base.py), so it warns
  on every Linux worker without torch, where `resource` is there; the only
  loss is its memory metric.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    if record.name.split(".")[0] in _OWN_LOGGERS:
      return True
    if str(record.msg).startswith(_BEAM_RESOURCE_WARNING):
      return False
    if record.name.startswith("apache_beam.runners"):
      return logging.WARNING <= record.levelno < logging.ERROR
    return record.levelno >= logging.WARNING


class _OneLineFormatter(logging.Formatter):
  """Formats a record without its traceback."""

  def format(self, record: logging.LogRecord) -> str:
    record = logging.makeLogRecord(record.__dict__)
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    return super().format(record)


def configure_logging(verbose: bool = False) -> None:
  """Console logging of `python -m beam_pipeline`.

  Args:
    verbose: everything from DEBUG, with tracebacks; otherwise our INFO
      messages and other libraries' warnings, one line each.
  """
  handler = logging.StreamHandler(sys.stderr)
  if verbose:
    handler.setFormatter(
        logging.Formatter("%(levelname)s %(name)s %(message)s"))
  else:
    handler.setFormatter(_OneLineFormatter("%(levelname)s %(message)s"))
    handler.addFilter(_ConsoleFilter())
  root = logging.getLogger()
  root.handlers[:] = [handler]
  root.setLevel(logging.DEBUG if verbose else logging.INFO)


def _io_failure_line(cause: failures.IoCause, output: str) -> str:
  where = f" ({cause.filename})" if cause.filename else ""
  return (f"error: the run stopped writing to {output}: {cause.reason}{where}"
          f" — {cause.advice}, then rerun the same command; the unfinished"
          " output is removed on rerun")


def _gcs_refused(exc: BaseException) -> Optional[int]:
  """One line and a status for a missing (2) or forbidden (4) bucket met
  before any work; None for anything else."""
  refusal = failures.gcs_refusal(exc)
  if refusal is None:
    return None
  _LOG.debug("Cloud Storage refused", exc_info=True)
  print(f"error: {refusal[1]}", file=sys.stderr)
  return EXIT_USAGE if refusal[0] == failures.HTTP_NOT_FOUND else EXIT_IO


def _run_pipeline(argv: List[str]) -> int:
  """Creates and runs the job; one line and a status for known failures."""
  from beam_pipeline import pipeline  # pylint: disable=import-outside-toplevel
  try:
    job = pipeline.create(argv)
  except failures.OutputNotWritable as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_IO
  except (ValueError, outputs.OutputDirInUse) as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_USAGE
  except Exception as e:  # pylint: disable=broad-except
    status = _gcs_refused(e)
    if status is None:
      raise
    return status
  try:
    manifest = pipeline.execute(job, progress_to=_console())
  except Exception as e:  # pylint: disable=broad-except
    if failures.interrupted(e):
      raise KeyboardInterrupt from e
    cause = failures.io_cause(e)
    if cause is not None:
      _LOG.debug("The run failed", exc_info=True)
      print(_io_failure_line(cause, job.options.output), file=sys.stderr)
      return EXIT_IO
    if isinstance(e, ValueError):
      # E.g. a model artifact replaced mid-job: the message says it all.
      _LOG.debug("The run failed", exc_info=True)
      print(f"error: {e}", file=sys.stderr)
      return EXIT_USAGE
    raise
  if schemas.MANIFEST_INVARIANT not in manifest:
    # No manifest was written (a Dataflow --dry_run, a job left running).
    print(f"Run {manifest.get(schemas.MANIFEST_RUN_ID)}"
          f" ({manifest.get(schemas.MANIFEST_COMMAND)}):"
          f" {manifest.get(schemas.EXECUTE_STATE)}; no manifest was written")
    return EXIT_OK
  print(format_summary(manifest))
  for line in error_lines(manifest):
    print(line)
  _LOG.debug(json.dumps(manifest))
  return exit_status(manifest)


def _run_reporting(command: str, argv: List[str]) -> int:
  """`summary`, `report` or `compare`; one line and status 2 where there is
  no run to read, or --output is a file."""
  # pylint: disable=import-outside-toplevel
  from reporting import compare, report, run_files, summary
  try:
    return {"summary": summary, "report": report,
            "compare": compare}[command].main(argv)
  except (run_files.RunDirError, output_dirs.OutputIsAFile) as e:
    _LOG.debug("No run to read, or nowhere to write", exc_info=True)
    print(f"error: {e}", file=sys.stderr)
    return EXIT_USAGE
  except Exception as e:  # pylint: disable=broad-except
    status = _gcs_refused(e)
    if status is None:
      raise
    return status


def main(argv: List[str]) -> int:
  """Runs a command; returns the exit status (see the README)."""
  argv = [a for a in argv if a != VERBOSE_FLAG]
  if argv and argv[0] == "--version":
    print(version())
    return EXIT_OK
  if not argv or argv[0] in ("-h", "--help", "help"):
    print_help()
    return EXIT_OK if argv else EXIT_USAGE
  if argv[0] in _PIPELINE_COMMANDS and any(
      a in ("-h", "--help") for a in argv[1:]):
    print_help(argv[0])
    return EXIT_OK
  if argv[0] not in _COMMANDS:
    print(f"error: {unknown_command(argv[0])}", file=sys.stderr)
    return EXIT_USAGE
  try:
    if argv[0] in _REPORTING_COMMANDS:
      return _run_reporting(argv[0], argv[1:])
    if argv[0] == "doctor":
      # Imported here: it loads TensorFlow, which other commands' launchers
      # do not need.
      from beam_pipeline import doctor  # pylint: disable=import-outside-toplevel
      return doctor.main(argv[1:])
    return _run_pipeline(argv)
  except KeyboardInterrupt:
    print(INTERRUPTED, file=sys.stderr)
    return EXIT_INTERRUPTED


class _MainThreadStderr(io.TextIOBase):
  """sys.stderr during a run: the main thread's writes, not the workers'.

  Beam's worker threads print the traceback of every bundle that fails or
  is cut short straight to sys.stderr (the in-process runner's threaded
  mode), and a dying thread's traceback goes there too; the launcher reports
  the failure itself, in one line. Logging is unaffected: its handler holds
  the real stream.
  """

  def __init__(self, stream):
    super().__init__()
    self._stream = stream

  def write(self, text: str) -> int:
    if threading.current_thread() is threading.main_thread():
      return self._stream.write(text)
    return len(text)

  def flush(self) -> None:
    self._stream.flush()

  def __getattr__(self, name):
    return getattr(self._stream, name)


def _console():
  """The console's stderr, for the progress thread: past _MainThreadStderr,
  which silences Beam's worker threads."""
  stream = sys.stderr
  return stream._stream if isinstance(stream, _MainThreadStderr) else stream  # pylint: disable=protected-access


def _exit_interrupted(unused_signum, unused_frame) -> NoReturn:
  """SIGINT: one line and out, without waiting for Beam's threads to stop
  (they would print their cut-short bundles, and can keep the process
  alive). What they wrote is a leftover that the rerun removes; the run's
  claim on --output goes now."""
  sys.stdout.flush()
  output_lock.release_held()
  print(INTERRUPTED, file=sys.__stderr__, flush=True)
  os._exit(EXIT_INTERRUPTED)  # pylint: disable=protected-access


def command_line(argv: Optional[List[str]] = None) -> NoReturn:
  """`python -m beam_pipeline`: console logging, `main`, and the exit."""
  argv = sys.argv[1:] if argv is None else list(argv)
  verbose = VERBOSE_FLAG in argv
  configure_logging(verbose)
  if not verbose:
    sys.stderr = _MainThreadStderr(sys.stderr)
  # Not where SIGINT is ignored (started in the background, nohup).
  if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _exit_interrupted)
  status = main(argv)
  if status in (EXIT_INTERRUPTED, EXIT_IO):
    # The runner's worker threads may be in the middle of a bundle, and the
    # interpreter would wait for them before exiting: leave at once.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # pylint: disable=protected-access
  sys.exit(status)
