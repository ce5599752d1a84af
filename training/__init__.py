"""Training companion: TFRecords from `python -m beam_pipeline preprocess` →
the model artifact that scoring loads (`python -m training train|evaluate`)."""

import os

# Same reason as in beam_pipeline/__init__.py: oneDNN is the fast fp32 path for
# VGG16 on CPUs where TensorFlow leaves it off. Must precede the TF import.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
