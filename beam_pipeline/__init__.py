"""Batch scoring of breast-ultrasound images on Apache Beam."""

import os

# oneDNN is off by default on some CPUs (AMD); it is the fastest fp32 path for
# VGG16's convolutions. Must be set before TensorFlow is first imported.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
