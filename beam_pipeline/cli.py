"""Command-line front end: runs a command and prints the run's summary."""

import json
import logging
import sys
from typing import List

from beam_pipeline import outputs

# Exit statuses, documented in the README ("Exit status").
EXIT_OK = 0
EXIT_USAGE = 2  # bad flags, an output refused, an input that matches nothing
EXIT_INVARIANT = 3  # the manifest's member invariant does not hold
EXIT_IO = 4  # no space left, read-only or unwritable output, ...
EXIT_INCOMPLETE = 5  # finished, but inputs promised more than could be read
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT)


def exit_status(manifest: dict) -> int:
  """The exit status a finished run's manifest calls for."""
  if not manifest["invariant"]["holds"]:
    return EXIT_INVARIANT
  if not manifest.get("complete", True):
    return EXIT_INCOMPLETE
  return EXIT_OK


def format_summary(manifest: dict) -> str:
  """The end-of-run summary a person reads."""
  counts = manifest.get("counts", {})
  lines = [f"Run {manifest.get('run_id')} ({manifest.get('command')})"
           f" finished in {manifest.get('wall_time_s')} s"]
  for key, value in counts.items():
    lines.append(f"  {key:<22} {value}")
  per_class = manifest.get("predicted_classes")
  if per_class:
    lines.append("  predicted classes:")
    for name, value in per_class.items():
      lines.append(f"    {name:<20} {value}")
  if "throughput_images_per_s" in manifest:
    lines.append(f"  throughput             "
                 f"{manifest['throughput_images_per_s']} images/s")
  invariant = manifest.get("invariant", {})
  lines.append(f"  {invariant.get('rule')}: "
               f"{'holds' if invariant.get('holds') else 'BROKEN'}")
  for name, value in (manifest.get("incomplete_because") or {}).items():
    lines.append(f"  INCOMPLETE: {name} = {value} (see the errors table)")
  lines.append(f"  outputs in {manifest.get('output')}")
  return "\n".join(lines)


USAGE = """python -m beam_pipeline COMMAND [flags] [Beam pipeline flags]

commands:
  preprocess  archives / images → DIR/tfrecords, DIR/errors, DIR/manifest.json
  score       TFRecords → DIR/predictions (needs --model)
  run         archives → TFRecords and predictions in one job (needs --model)
  summary     DuckDB SQL summary of a run: summary --output DIR
  report      HTML run report: report --predictions DIR --output REPORT_DIR

Beam's own flags (--runner, --direct_num_workers, --project, ...) pass
through. See README.md."""


def print_help() -> None:
  """The commands and every project flag with its default."""
  import argparse  # pylint: disable=import-outside-toplevel
  from beam_pipeline.options import BusiOptions  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(
      usage=USAGE, add_help=False,
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  BusiOptions._add_argparse_args(parser)  # pylint: disable=protected-access
  parser.print_help()


def main(argv: List[str]) -> int:
  if not argv or argv[0] in ("-h", "--help", "help") or (
      argv[0] in ("preprocess", "score", "run") and
      any(a in ("-h", "--help") for a in argv[1:])):
    print_help()
    return 0 if argv else 2
  from beam_pipeline import pipeline  # pylint: disable=import-outside-toplevel
  if argv and argv[0] == "summary":
    from beam_pipeline import sql_summary  # pylint: disable=import-outside-toplevel
    return sql_summary.main(argv[1:])
  if argv and argv[0] == "report":
    from beam_pipeline import report  # pylint: disable=import-outside-toplevel
    return report.main(argv[1:])
  try:
    manifest = pipeline.run(argv)
  except (ValueError, outputs.OutputDirInUse) as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_USAGE
  if "invariant" not in manifest:
    # No manifest was written (a Dataflow --dry_run, a job left running).
    print(f"Run {manifest.get('run_id')} ({manifest.get('command')}):"
          f" {manifest.get('state')}; no manifest was written")
    return 0
  print(format_summary(manifest))
  logging.getLogger(__name__).debug(json.dumps(manifest))
  return exit_status(manifest)
