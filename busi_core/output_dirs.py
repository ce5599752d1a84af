"""Output directories: the check every command makes before any work."""

import os


class OutputIsAFile(ValueError):
  """--output names a file, or a path under one."""


def check_is_directory(output: str, error=OutputIsAFile,
                       wanted: str = "it is created if missing") -> None:
  """Refuses a local `output` that is a file, or lies under one, before a
  command spends time on work it could not write (a directory that does not
  exist yet is fine: it is created).

  Args:
    output: the --output value (local path or URI).
    error: the ValueError subclass to raise (OutputIsAFile).
    wanted: what directory to pass instead, in the message's brackets.

  Raises:
    error: naming the file and what to pass instead.
  """
  if "://" in output:
    return  # object stores have no folders: any prefix can hold output
  path = os.path.abspath(output)
  while not os.path.lexists(path):
    parent = os.path.dirname(path)
    if parent == path:
      return
    path = parent
  if not os.path.isdir(path):
    what = "is a file" if path == os.path.abspath(output) else (
        f"lies under the file {path}")
    raise error(f"--output {output} {what}, not a directory; pass a"
                f" directory ({wanted})")


def _holds_artifact(output: str) -> bool:
  """Whether `output` holds a model artifact (its metadata.json)."""
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel
  import schemas  # pylint: disable=import-outside-toplevel
  return FileSystems.exists(FileSystems.join(output.rstrip("/") or output,
                                             schemas.METADATA_FILE))


def check_artifact_dir(output: str, overwrite: bool) -> None:
  """Where `train` or `recalibrate` writes an artifact: not a file, and not
  over an artifact unless --overwrite says so.

  Raises:
    ValueError: saying what to pass instead.
  """
  check_is_directory(output)
  if _holds_artifact(output) and not overwrite:
    raise ValueError(
        f"{output} already holds a model artifact. Choose a new"
        " --output, or pass --overwrite to replace it.")


def check_report_dir(output: str, report_file: str, overwrite: bool,
                     command: str) -> None:
  """Where `evaluate` or `cv` writes its report: not a file, not a model
  artifact's directory (the report's files would replace the artifact's
  own: its confusion matrix, its cross-validation), and not over an earlier
  report unless --overwrite says so. Checked before any work.

  Args:
    output: the --output value (local path or URI).
    report_file: the report's main file, e.g. "metrics.json".
    overwrite: --overwrite was given.
    command: the command, for the message.

  Raises:
    ValueError: saying what to pass instead.
  """
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel
  check_is_directory(output)
  if _holds_artifact(output):
    raise ValueError(
        f"--output {output} holds a model artifact: {command} writes its"
        " report into a directory of its own, and would replace the"
        " artifact's files. Choose another --output.")
  if FileSystems.exists(FileSystems.join(output.rstrip("/") or output,
                                         report_file)) and not overwrite:
    raise ValueError(
        f"{output} already holds a {command} report ({report_file}). Choose"
        " a new --output, or pass --overwrite to replace it.")
