"""The GPU recipe is checked before a job is built; the docs and images
follow it (README, Dockerfile, flex/)."""

import os
import re
import shlex

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from beam_pipeline import cli, options as opts_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
L4 = "type:nvidia-l4;count:1;install-nvidia-driver"


def _validate(*flags):
  options = PipelineOptions(["--input", "gs://b/in/*.zip", "--output",
                             "gs://b/out", "--model", "gs://b/m", *flags])
  return opts_lib.validate(opts_lib.RUN, options)


def test_recipe_is_accepted_and_keeps_one_model_per_gpu():
  assert _validate("--inference_accelerator",
                   opts_lib.GPU_RECIPE).model_copies == 1
  whole_job = _validate("--dataflow_service_options",
                        f"worker_accelerator={L4}", "--machine_type",
                        "g2-standard-8")
  assert whole_job.model_copies == 1
  assert _validate("--inference_accelerator", opts_lib.GPU_RECIPE,
                   "--model_copies", "2").model_copies == 2
  # CPU jobs keep Beam's default: one model per SDK process.
  assert _validate().model_copies is None


@pytest.mark.parametrize("flags, message", [
    (["--inference_accelerator", L4],
     "nvidia-l4 GPUs come only with g2-* machine types; add machine_type"),
    (["--inference_accelerator",
      "type:nvidia-l4;count:1;machine_type:n1-standard-8;"
      "install-nvidia-driver"], "cannot carry nvidia-l4"),
    (["--inference_accelerator",
      "type:nvidia-l4;count:1;machine_type:g2-standard-48;"
      "install-nvidia-driver"], "more than one L4"),
    (["--inference_accelerator",
      "type:nvidia-l4;count:2;machine_type:g2-standard-24;"
      "install-nvidia-driver"], "use count:1"),
    (["--inference_accelerator",
      "type:nvidia-l4;count:1;machine_type:g2-standard-4"],
     "lacks install-nvidia-driver"),
    (["--inference_accelerator", "nvidia-l4"], "needs both type: and count:"),
    (["--inference_accelerator", "type:nvidia-l4;count:one"],
     "is not a number"),
    (["--inference_accelerator", "type:nvidia-tesla-t4;count:1;"
      "machine_type:g2-standard-4;install-nvidia-driver"], "N1 machine types"),
    (["--dataflow_service_options", f"worker_accelerator={L4}"],
     "add --machine_type"),
    (["--dataflow_service_options", f"worker_accelerator={L4}",
      "--machine_type", "n2-standard-8"], "--machine_type n2-standard-8"
     " cannot carry"),
    (["--dataflow_service_options",
      f"worker_accelerator={opts_lib.GPU_RECIPE}"],
     "pass --machine_type g2-standard-4 instead"),
    (["--inference_accelerator", opts_lib.GPU_RECIPE,
      "--dataflow_service_options", f"worker_accelerator={L4}"],
     "exclusive"),
    (["--inference_accelerator", opts_lib.GPU_RECIPE, "--experiments",
      "no_use_multiple_sdk_containers"], "--model_copies"),
    (["--model_copies", "0"], "--model_copies must be at least 1"),
])
def test_wrong_gpu_requests_are_refused(flags, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    _validate(*flags)


def test_n1_gpus_need_no_machine_type():
  assert _validate("--inference_accelerator",
                   "type:nvidia-tesla-t4;count:1;install-nvidia-driver"
                   ).model_copies == 1


def _readme():
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    return f.read()


def _shell_commands(text):
  """The `python -m beam_pipeline ...` commands of a Markdown text's bash
  blocks, continuation lines joined, split as the shell would."""
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", text, re.S):
    for line in block.replace("\\\n", " ").splitlines():
      line = line.split(" #", 1)[0].strip()
      if line.startswith("python -m beam_pipeline "):
        commands.append(shlex.split(line))
  return commands


def test_readme_gpu_commands_follow_the_recipe():
  commands = _shell_commands(_readme())
  assert not any(opts_lib.SINGLE_SDK_CONTAINER_EXPERIMENT in arg
                 for command in commands for arg in command)
  gpu_runs = [c for c in commands if any("nvidia" in arg for arg in c)]
  assert len(gpu_runs) >= 2, "the README shows both GPU variants"
  for command in gpu_runs:
    flags = dict(zip(command, command[1:]))
    hint = flags.get("--inference_accelerator")
    if hint:
      assert "machine_type:g2-standard-" in hint, command
    else:
      assert flags["--machine_type"].startswith("g2-standard-"), command
    # The README's own command passes the checks (placeholders filled in;
    # $BUCKET is a gs:// bucket, as Dataflow needs).
    filled = [re.sub(r"\$\{?(\w+)\}?", lambda m: "gs://b" if m.group(1) ==
                     "BUCKET" else "x", a) for a in command[3:]]
    assert opts_lib.validate(opts_lib.RUN, PipelineOptions(
        filled)).model_copies == 1


def test_doctor_is_a_command_and_the_first_one_in_the_worker_image(capsys):
  assert cli.main(["--help"]) == cli.EXIT_OK
  assert "doctor" in capsys.readouterr().out
  readme = _readme()
  assert "python -m beam_pipeline doctor" in readme
  with open(os.path.join(ROOT, "Dockerfile"), encoding="utf-8") as f:
    dockerfile = f.read()
  assert "python -m beam_pipeline doctor --model" in smoke_step(dockerfile)
  assert "TF_FORCE_GPU_ALLOW_GROWTH=true" in dockerfile


def smoke_step(dockerfile: str) -> str:
  """The shell command of the Dockerfile's RUN that calls doctor."""
  joined = dockerfile.replace("\\\n", " ")
  runs = [line[len("RUN "):] for line in joined.splitlines()
          if line.startswith("RUN ") and "beam_pipeline doctor" in line]
  assert len(runs) == 1, "one smoke step"
  return runs[0]
