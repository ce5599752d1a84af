"""The Dataflow Flex Template of `run`: its metadata and its launcher's argv.

`flex/metadata.json` is generated from BusiOptions (the flags `run` takes),
so the template's parameters cannot drift from the pipeline's flags:

    python -m beam_pipeline.flex_template > flex/metadata.json

(tests/test_flex_template.py fails when the file is not what this prints).
`flex/main.py`, the template's entry point, turns the launcher's
`--name=value` parameters into a `run` command line (`launcher_argv`).
"""

import argparse
import json
import logging
import os
import re
import sys
from typing import Dict, List, Optional, Sequence

from beam_pipeline import options as opts_lib

_LOG = logging.getLogger(__name__)

NAME = "BUSI breast-ultrasound scoring"
DESCRIPTION = (
    "Reads breast-ultrasound archives (zip, tar) or image files, writes"
    " TFRecords and scores every image with a VGG16 model artifact through"
    " Beam RunInference: predictions (Parquet), errors and a manifest under"
    " the output directory. `python -m beam_pipeline run` as a template.")
# Flags the job cannot run without; `validate` refuses the job otherwise.
REQUIRED = ("input", "output", "model")
# The worker image this launcher image was built from (flex/Dockerfile):
# the job's sdk_container_image unless the run names one.
WORKER_IMAGE_ENV = "BUSI_WORKER_IMAGE"
_PATH_REGEX = r"^gs://[^\r\n]+$"
_INT_REGEX = r"^[0-9]+$"
_FLOAT_REGEX = r"^([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$"
_BOOL_REGEX = "^(true|false)$"
_LABELS = {"input": "Input archives or images (gs:// glob)",
           "output": "Output directory (gs://)",
           "model": "Model artifact directory (gs://)"}
# Paths Dataflow's workers must read: gs:// only (as `run` checks them).
_GCS_ONLY = REQUIRED + ("skip_scored",)
# Where the command line's help does not hold for a template run: one value
# a parameter, gs:// paths only, no launcher environment to set.
_TEMPLATE_HELP = {
    "input": "Input glob (gs://) of .zip, .tar, .tar.gz, .tgz archives or"
             " image files. One glob per template run (the command line"
             " repeats --input for several).",
    "output": "Output directory (gs://).",
    "model": "Model artifact directory (gs://).",
    "skip_scored": "Leave out images whose image_id already has a"
                   " prediction by the same model version in an earlier"
                   " run's predictions (a gs:// glob of their output"
                   " directories, one per template run); they are counted as"
                   " already_scored.",
    "study_hmac_key": "Key (16+ characters) of the study_key and series_key"
                      " columns, HMAC-SHA256 of the DICOM Study/Series"
                      " Instance UIDs; without it the columns are null. A"
                      " template run can only pass it here (there is no"
                      " launcher environment for $BUSI_STUDY_HMAC_KEY): the"
                      " pipeline drops it from the job's options once read,"
                      " but Dataflow may keep the launch parameters with the"
                      " job, so limit who can view its jobs.",
}
# The command line's help says which commands a flag serves; the template
# is `run`'s.
_COMMANDS_PREFIX = re.compile(r"^(?:preprocess|score)/run[:,] ")


def _run_actions() -> List[argparse.Action]:
  """BusiOptions' argparse actions of the flags `run` takes, in order."""
  parser = argparse.ArgumentParser(add_help=False)
  opts_lib.BusiOptions._add_argparse_args(parser)  # pylint: disable=protected-access
  by_dest = {a.dest: a for a in parser._actions}  # pylint: disable=protected-access
  return [by_dest[name] for name in opts_lib.COMMAND_FLAGS[opts_lib.RUN]]


def _is_flag(action: argparse.Action) -> bool:
  return isinstance(action, argparse._StoreTrueAction)  # pylint: disable=protected-access


def _regex(action: argparse.Action) -> Optional[str]:
  if action.dest in _GCS_ONLY:
    return _PATH_REGEX
  if action.choices:
    return "^(" + "|".join(action.choices) + ")$"
  if _is_flag(action):
    return _BOOL_REGEX
  if action.type is int:
    return _INT_REGEX
  if action.type is float:
    return _FLOAT_REGEX
  return None


def _help(action: argparse.Action) -> str:
  text = _TEMPLATE_HELP.get(action.dest) or _COMMANDS_PREFIX.sub(
      "", (action.help or "").replace("%%", "%"))
  text = text[:1].upper() + text[1:]
  if _is_flag(action):
    text += " true or false (default: false)."
  elif action.default is not None:
    text += f" (default: {action.default})"
  return text


def _label(name: str) -> str:
  return _LABELS.get(name, name.replace("_", " ").capitalize())


def metadata() -> Dict:
  """The Flex Template metadata of `run` (Dataflow's metadata.json format)."""
  parameters = []
  for action in _run_actions():
    parameter = {"name": action.dest, "label": _label(action.dest),
                 "helpText": _help(action),
                 "isOptional": action.dest not in REQUIRED}
    regex = _regex(action)
    if regex:
      parameter["regexes"] = [regex]
    parameters.append(parameter)
  return {"name": NAME, "description": DESCRIPTION, "parameters": parameters}


def launcher_argv(parameters: Sequence[str],
                  environ: Optional[Dict[str, str]] = None) -> List[str]:
  """`run` flags from the launcher's `--name=value` parameters.

  Boolean parameters arrive as `--overwrite=true`; our flags are switches
  (`--overwrite`), so `true` becomes the switch and `false` drops it. Beam's
  own flags (`--runner`, `--project`, ...) pass through. Without an
  `--sdk_container_image`, workers run the image the launcher was built
  from, so that launch and runtime environments are the same.

  Raises:
    ValueError: a boolean parameter that is neither true nor false.
  """
  environ = os.environ if environ is None else environ
  switches = {f"--{a.dest}" for a in _run_actions() if _is_flag(a)}
  argv = [opts_lib.RUN]
  for arg in parameters:
    name, sep, value = arg.partition("=")
    if sep and name in switches:
      if value.lower() not in ("true", "false"):
        raise ValueError(f"{name} takes true or false, not {value!r}")
      if value.lower() == "true":
        argv.append(name)
      continue
    argv.append(arg)
  image = environ.get(WORKER_IMAGE_ENV)
  given = [a.partition("=")[2] for a in argv
           if a.startswith("--sdk_container_image=")]
  if image and not any(a.startswith("--sdk_container_image") for a in argv):
    argv.append(f"--sdk_container_image={image}")
  elif image and given and given[0] != image:
    _LOG.warning("Workers run %s, the launcher %s: their packages may differ",
                 given[0], image)
  return argv


def main() -> None:
  json.dump(metadata(), sys.stdout, indent=2, ensure_ascii=False)
  sys.stdout.write("\n")


if __name__ == "__main__":
  main()
