"""What TensorFlow sees of the machine: build, devices, GPU memory growth.

Used where the model loads (`model_handler`) and by `python -m beam_pipeline
doctor`. TensorFlow is imported inside the functions: the launcher and the
CPU-only steps never need it.
"""

import logging
from typing import Dict, List, NamedTuple

_LOG = logging.getLogger(__name__)


class Device(NamedTuple):
  """A device TensorFlow can place work on."""
  name: str  # e.g. "/physical_device:GPU:0"
  kind: str  # "CPU" or "GPU"
  details: Dict[str, object]  # GPU name and compute capability, if known


def build_info() -> Dict[str, object]:
  """TensorFlow's version and the CUDA/cuDNN it was built against."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  info = dict(tf.sysconfig.get_build_info())
  return {"tensorflow": tf.__version__,
          "is_cuda_build": bool(info.get("is_cuda_build")),
          "cuda_version": info.get("cuda_version"),
          "cudnn_version": info.get("cudnn_version"),
          "cuda_compute_capabilities": info.get("cuda_compute_capabilities")}


def visible_devices() -> List[Device]:
  """The physical devices TensorFlow sees (a GPU it cannot open is absent:
  TensorFlow then runs on the CPU without failing)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  devices = []
  for device in tf.config.list_physical_devices():
    details = {}
    if device.device_type == "GPU":
      try:
        details = dict(tf.config.experimental.get_device_details(device))
      except (RuntimeError, ValueError):
        details = {}
    devices.append(Device(device.name, device.device_type, details))
  return devices


def enable_memory_growth() -> int:
  """Lets TensorFlow take GPU memory as it needs it instead of all at once.

  By default one TensorFlow process reserves nearly all of a GPU's memory at
  its first op, so any second process on the VM (another model copy, Grad-CAM)
  fails to allocate. Must run before TensorFlow initialises the GPUs; where it
  is too late the setting in force stays, with a warning (the worker image
  also sets TF_FORCE_GPU_ALLOW_GROWTH=true, which covers that case).

  Returns:
    The number of GPUs now growing their memory.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  grown = 0
  for gpu in tf.config.list_physical_devices("GPU"):
    try:
      tf.config.experimental.set_memory_growth(gpu, True)
      grown += 1
    except RuntimeError:
      if tf.config.experimental.get_memory_growth(gpu):
        grown += 1
      else:
        _LOG.warning("GPU %s was initialised before memory growth could be"
                     " turned on", gpu.name)
  return grown
