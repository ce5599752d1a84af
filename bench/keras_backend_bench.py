"""The artifact's inference throughput on a non-TensorFlow Keras backend.

For GPU machines that have JAX or PyTorch but no TensorFlow: loads
`model.keras` (safe mode, the project's registered layers) on
KERAS_BACKEND=jax (default) or torch, and times the forward pass on uint8
batches in float32 and bfloat16 at several batch sizes. Prints images/s,
achieved TFLOP/s (from the model's own layer shapes) and the fraction of the
peak for that precision (--peak_tflops_bf16, --peak_tflops_fp32), plus the
bfloat16 cost against float32 on the same images.

Needs only numpy, keras and the backend: this module imports neither
TensorFlow nor Beam. Warm-up (compilation) excluded; medians of --repeats.

  KERAS_BACKEND=jax python -m bench.keras_backend_bench --model MODEL_DIR
"""

import argparse
import json
import os
import statistics
import sys
import time
from typing import Dict, List


def model_flops(model) -> float:
  """Floating-point operations (2 per multiply-add) of one image's forward."""
  flops = 0.0
  for layer in model.layers:
    kind = layer.__class__.__name__
    if kind == "Conv2D":
      _, height, width, out_channels = layer.output.shape
      kh, kw = layer.kernel_size
      in_channels = layer.input.shape[-1]
      flops += 2.0 * height * width * kh * kw * in_channels * out_channels
    elif kind == "Dense":
      flops += 2.0 * layer.input.shape[-1] * layer.units
  return flops


def _sync(value):
  """Blocks until the backend has computed `value` (device work is async)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  return np.asarray(value)


def time_forward(model, images, repeats: int) -> float:
  """Median seconds of one forward pass of `images`, compiled, warm."""
  import keras  # pylint: disable=import-outside-toplevel
  backend = keras.backend.backend()
  if backend == "jax":
    import jax  # pylint: disable=import-outside-toplevel
    state = ([v.value for v in model.trainable_variables],
             [v.value for v in model.non_trainable_variables])
    call = jax.jit(lambda tv, ntv, x: model.stateless_call(
        tv, ntv, x, training=False)[0])
    run = lambda: call(*state, images).block_until_ready()  # noqa: E731
  elif backend == "torch":
    import torch  # pylint: disable=import-outside-toplevel
    x = torch.as_tensor(images, device="cuda" if torch.cuda.is_available()
                        else "cpu")

    def run():
      with torch.no_grad():
        out = model(x, training=False)
      if torch.cuda.is_available():
        torch.cuda.synchronize()
      return out
  else:
    run = lambda: _sync(model(images, training=False))  # noqa: E731
  run()
  run()  # warm-up: compilation, autotuning
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    run()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def run(model_dir: str, batch_sizes: List[int], precisions: List[str],
        repeats: int, peak_tflops: Dict[str, float]) -> Dict:
  import keras  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import busi_core.layers  # pylint: disable=import-outside-toplevel,unused-import
  from busi_core.precision import with_precision  # pylint: disable=import-outside-toplevel
  base = keras.saving.load_model(os.path.join(model_dir, "model.keras"),
                                 safe_mode=True, compile=False)
  size = base.inputs[0].shape[1]
  flops = model_flops(base)
  rng = np.random.default_rng(0)  # random pixels: zeros can run faster
  out = {"backend": keras.backend.backend(), "image_size": size,
         "gflop_per_image": round(flops / 1e9, 3), "peak_tflops": peak_tflops,
         "results": []}
  reference = None
  for precision in precisions:
    model = with_precision(base, precision)
    for batch in batch_sizes:
      images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
      seconds = time_forward(model, images, repeats)
      tflops = flops * batch / seconds / 1e12
      out["results"].append({
          "precision": precision, "batch_size": batch,
          "images_per_s": round(batch / seconds, 1),
          "tflops": round(tflops, 2),
          "fraction_of_peak": round(tflops / peak_tflops[precision], 4)})
    check = rng.integers(0, 256, (16, size, size, 3), dtype=np.uint8)
    probs = np.asarray(model.predict(check, verbose=0), np.float64)
    if reference is None:
      reference = probs
    else:
      out[f"{precision}_vs_float32"] = {
          "max_probability_difference": round(
              float(np.abs(probs - reference).max()), 5),
          "changed_predictions": int(
              (probs.argmax(1) != reference.argmax(1)).sum()),
          "images": len(check)}
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--model", required=True, help="Artifact directory.")
  parser.add_argument("--batch_sizes", default="8,32,128")
  parser.add_argument("--precisions", default="float32,bfloat16")
  parser.add_argument("--repeats", type=int, default=10)
  # H100/H200 SXM datasheet, dense: bf16/fp16 tensor cores 989 TFLOP/s;
  # float32 runs as TF32 on tensor cores under JAX/XLA's default precision
  # (495), 67 on the CUDA cores otherwise. A measured large bf16 matmul on
  # these machines reached ~790.
  parser.add_argument("--peak_tflops_bf16", type=float, default=989.0)
  parser.add_argument("--peak_tflops_fp32", type=float, default=495.0)
  args = parser.parse_args(argv)
  peaks = {"bfloat16": args.peak_tflops_bf16, "float16": args.peak_tflops_bf16,
           "float32": args.peak_tflops_fp32}
  figures = run(args.model, [int(b) for b in args.batch_sizes.split(",")],
                args.precisions.split(","), args.repeats, peaks)
  for row in figures["results"]:
    print(f"{figures['backend']:<6} {row['precision']:<9} batch"
          f" {row['batch_size']:>4}: {row['images_per_s']:>9} img/s"
          f" {row['tflops']:>8} TFLOP/s  {100 * row['fraction_of_peak']:.1f}%"
          " of peak", file=sys.stderr)
  print(json.dumps(figures, indent=2))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
