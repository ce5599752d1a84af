"""busi_core.gradcam on a reduced-precision model (the lead's module, fixed)."""

import numpy as np

from busi_core.precision import with_precision
from busi_core import gradcam
from training import model as model_lib


def test_heatmaps_of_a_bfloat16_model_are_float32():
  model = model_lib.build_model(32, backbone="tiny")
  pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), np.uint8)
  reference = gradcam.heatmaps(model, pixels, [0, 2])
  # Before the fix cv2.resize refused the bfloat16 maps.
  maps = gradcam.heatmaps(with_precision(model, "bfloat16"), pixels, [0, 2])
  assert maps.dtype == np.float32 and maps.shape == (2, 32, 32)
  assert 0.0 <= maps.min() and maps.max() <= 1.0 + 1e-6
  assert np.abs(maps - reference).mean() < 0.1
