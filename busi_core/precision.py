"""Reduced-precision copies of an artifact model (Keras only, any backend).

Kept free of TensorFlow and Beam so that the GPU benchmark can use it on a
JAX or PyTorch Keras backend.
"""

# Layers kept in float32 under reduced precision: the uint8 → float input
# preprocessing (means subtracted exactly) and the calibrated softmax (so that
# probabilities still sum to 1 and compare with the threshold as in float32).
_FLOAT32_LAYERS = ("InputLayer", "VGGPreprocess", "TemperatureScaling",
                   "Softmax")
_POLICIES = {"bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
# CPU flags (Linux /proc/cpuinfo) of instructions that compute in bfloat16:
# AMX tiles (Intel Sapphire Rapids and later) and AVX512-BF16 (Cooper Lake,
# AMD Zen 4), the faster first. Without them oneDNN emulates bfloat16, slower
# than float32.
AMX_BFLOAT16 = "amx_bf16"
CPU_BFLOAT16_FLAGS = (AMX_BFLOAT16, "avx512_bf16")


def cpu_bfloat16_flags(cpuinfo: str = "/proc/cpuinfo") -> tuple:
  """The CPU_BFLOAT16_FLAGS this machine's CPU reports, in that order; empty
  where it reports none or there is no /proc/cpuinfo (not Linux)."""
  try:
    with open(cpuinfo, encoding="utf-8", errors="replace") as f:
      text = f.read()
  except OSError:
    return ()
  flags = set()
  for line in text.splitlines():
    key, _, value = line.partition(":")
    if key.strip() == "flags":
      flags.update(value.split())
  return tuple(flag for flag in CPU_BFLOAT16_FLAGS if flag in flags)


def with_precision(model, precision: str):
  """The model with its convolutions and dense layers in reduced precision.

  Keras mixed precision: weights stay float32, computation runs in
  bfloat16/float16 (fast on GPUs with tensor cores; on CPUs only where the
  hardware has bf16 instructions). `python -m bench` measures the accuracy
  cost against float32.

  Args:
    model: a loaded artifact model (float32).
    precision: "float32" (returned unchanged), "bfloat16" or "float16".
  """
  if precision == "float32":
    return model
  import keras  # pylint: disable=import-outside-toplevel
  policy = {"module": "keras", "class_name": "DTypePolicy",
            "config": {"name": _POLICIES[precision]}, "registered_name": None}
  config = model.get_config()
  for layer in config["layers"]:
    if layer["class_name"] not in _FLOAT32_LAYERS:
      layer["config"]["dtype"] = policy
  clone = keras.Model.from_config(config)
  clone.set_weights(model.get_weights())
  return clone
