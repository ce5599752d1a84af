"""`python -m beam_pipeline doctor`: does this machine run the model, and where?

The first command to run inside the worker image (and its build's smoke
step): TensorFlow's version and the CUDA/cuDNN it was built for, the devices
it sees (TensorFlow falls back to the CPU silently when it cannot open a
GPU), and, with `--model`, the artifact loaded exactly as the pipeline's
model handler loads it and a few batches timed.
"""

import argparse
import platform
import sys
import time
from typing import List, Optional, TextIO

import numpy as np

from beam_pipeline import devices, model_handler, options as opts_lib
from busi_core import artifact, spelling

EXIT_OK = 0
# As `run` answers an artifact that does not load: something to fix before
# a job can start.
EXIT_FAILED = 2


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m beam_pipeline doctor", allow_abbrev=False,
      description="Print TensorFlow's build (CUDA, cuDNN) and the devices it"
      " sees; with --model, load the artifact as scoring does and time a few"
      " batches.")
  parser.add_argument("--model", default=None,
                      help="Model artifact directory (local or gs://).")
  parser.add_argument("--batch_size", type=int, default=32,
                      help="Images per timed batch (default: %(default)s).")
  parser.add_argument("--batches", type=int, default=5,
                      help="Batches timed after a first, untimed one"
                      " (default: %(default)s).")
  parser.add_argument("--inference_precision", choices=opts_lib.PRECISIONS,
                      default="float32",
                      help="As the pipeline's flag (default: %(default)s).")
  parser.add_argument("--require_gpu", action="store_true",
                      help="Fail unless TensorFlow sees a GPU (use on GPU"
                      " workers: a CPU fallback is otherwise silent).")
  return parser


def _print_environment(out: TextIO) -> List[devices.Device]:
  import apache_beam  # pylint: disable=import-outside-toplevel
  import keras  # pylint: disable=import-outside-toplevel
  info = devices.build_info()
  cuda = (f"CUDA {info['cuda_version']}, cuDNN {info['cudnn_version']}"
          if info["is_cuda_build"] else "no CUDA (CPU-only build)")
  print(f"TensorFlow {info['tensorflow']} built for {cuda}", file=out)
  print(f"Keras {keras.__version__}, Apache Beam {apache_beam.__version__},"
        f" Python {platform.python_version()}", file=out)
  grown = devices.enable_memory_growth()
  seen = devices.visible_devices()
  print("Devices TensorFlow sees:", file=out)
  for device in seen:
    extra = ", ".join(f"{k}={v}" for k, v in sorted(device.details.items()))
    print(f"  {device.name}" + (f" ({extra})" if extra else ""), file=out)
  gpus = [d for d in seen if d.kind == "GPU"]
  if gpus:
    print(f"GPU memory growth: on for {grown} of {len(gpus)}", file=out)
  else:
    print("No GPU: TensorFlow runs on the CPU", file=out)
  return seen


def _time_model(model_dir: str, batch_size: int, batches: int,
                precision: str, out: TextIO) -> None:
  """Loads the artifact through ArtifactModelHandler and times batches.

  Raises:
    Exception: whatever stops the model loading or running.
  """
  _, metadata = artifact.read_artifact_info(model_dir)
  handler = model_handler.ArtifactModelHandler(
      model_dir, batch_size=batch_size, precision=precision)
  started = time.perf_counter()
  model = handler.load_model()
  loaded_s = time.perf_counter() - started
  print(f"Model {metadata.model_version} ({metadata.image_size}x"
        f"{metadata.image_size}, {precision}) loaded in {loaded_s:.1f} s",
        file=out)
  for line in artifact.model_warning_lines(metadata):
    print(f"WARNING: {line}", file=out)
  size = metadata.image_size
  rng = np.random.default_rng(0)
  batch = list(rng.integers(0, 256, size=(batch_size, size, size, 3),
                            dtype=np.uint8))
  started = time.perf_counter()
  list(handler.run_inference(batch, model))  # traces and compiles
  first_s = time.perf_counter() - started
  started = time.perf_counter()
  for _ in range(batches):
    list(handler.run_inference(batch, model))
  elapsed = time.perf_counter() - started
  rate = batches * batch_size / elapsed if elapsed > 0 else float("inf")
  print(f"First batch (tracing) {first_s:.1f} s; {batches} batches of"
        f" {batch_size}: {rate:.1f} images/s", file=out)


def main(argv: Optional[List[str]] = None, out: TextIO = sys.stdout,
         err: TextIO = sys.stderr) -> int:
  """Runs the checks; returns the exit status.

  Returns:
    EXIT_OK, or EXIT_FAILED after one line on `err` when --require_gpu finds
    no GPU or the model does not load or run.
  """
  args = spelling.parse_args(_parser(), argv)
  if args.batch_size < 1 or args.batches < 1:
    print("error: --batch_size and --batches must be at least 1", file=err)
    return EXIT_FAILED
  seen = _print_environment(out)
  if args.require_gpu and not any(d.kind == "GPU" for d in seen):
    print("error: --require_gpu: TensorFlow sees no GPU (check the"
          " accelerator's install-nvidia-driver, the machine type, and that"
          " the image's TensorFlow is a CUDA build)", file=err)
    return EXIT_FAILED
  if args.model:
    try:
      _time_model(args.model, args.batch_size, args.batches,
                  args.inference_precision, out)
    except Exception as e:  # pylint: disable=broad-except
      # A diagnosis, not a crash: say what failed in one line.
      reason = " ".join(str(e).split()) or type(e).__name__
      print(f"error: the model in {args.model} does not load or run:"
            f" {reason}", file=err)
      return EXIT_FAILED
  return EXIT_OK
