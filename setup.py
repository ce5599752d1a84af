"""Packaging for the launcher and for Dataflow workers (`--setup_file ./setup.py`)."""

import re
from pathlib import Path

import setuptools

_VERSION = re.search(
    r'^PACKAGE_VERSION = "([^"]+)"',
    (Path(__file__).parent / "schemas" / "features.py").read_text(),
    re.M,
).group(1)

# Bounds are the versions tested together on Python 3.11; the upper bounds stop
# at the next major/minor release that has not been tried.
REQUIRED = [
    "tensorflow>=2.21,<2.22",
    "keras>=3.15,<3.16",
    # bfloat16 numpy arrays of training's cache (a Keras/TF dependency too).
    "ml_dtypes>=0.7,<0.8",
    "apache-beam[gcp]>=2.77,<2.78",
    # Beam's TF model handler imports tensorflow_hub; Beam's own extra pins a
    # version that breaks on TF >= 2.16.
    "tensorflow-hub>=0.16.1,<0.17",
    "numpy>=2.4,<2.5",
    "protobuf>=6.33,<7",
    "pyarrow>=25,<26",
    "opencv-python-headless>=4.10,<6",
    "google-cloud-storage>=3.17,<4",
    "duckdb>=2.0.1,<2.1",
    "matplotlib>=3.9,<4",
    "pillow>=11,<13",
    # ISA-L deflate: gzip TFRecords at ~40x the speed of zlib level 6.
    "isal>=1.7,<2",
    # CRC32C of TFRecord frames (the fail-small reader and the writer).
    "google-crc32c>=1.5,<2",
    # DICOM: pydicom (MIT) reads the files; its pixel decoder plugins are
    # chosen so that every compressed syntax has one and none is GPL
    # (README, "DICOM input"): Pillow (HPND, above) JPEG baseline,
    # pylibjpeg-openjpeg (MIT) JPEG 2000, pyjpegls (MIT; CharLS, BSD-3)
    # JPEG-LS, python-gdcm (BSD-3) JPEG extended and lossless. Not
    # pylibjpeg-libjpeg: GPL-3.0.
    "pydicom>=3.0.2,<3.1",
    "pylibjpeg>=2.1,<3",
    "pylibjpeg-openjpeg>=2.6,<3",
    "pyjpegls>=1.5.1,<2",
    "python-gdcm>=3.2.6,<3.3",
]

EXTRAS = {
    "test": [
        "pytest>=8",
        # ./run_tests.sh spreads the tests over the CPUs (-n).
        "pytest-xdist>=3.5,<4",
        "hypothesis>=6",
        "gcp-storage-emulator>=2024.8.3",
        # The import contract (.importlinter), run by the tests.
        "import-linter>=2.1,<3",
    # Beam builds the --setup_file sdist with it when launching on Dataflow.
    "build>=1",
    # The artifact must load on any Keras 3 backend: a test loads it on JAX.
    "jax>=0.4.30",
    ],
}

setuptools.setup(
    name="busi-scoring",
    version=_VERSION,
    description=(
        "Batch scoring of breast-ultrasound images with VGG16 on Apache Beam,"
        " and the training companion that builds the model artifact."),
    # Every Python that Beam 2.77 (3.10 to 3.14) and TensorFlow 2.21 (3.10 to
    # 3.13) both have wheels for, from 3.11.8 on: earlier 3.11 and 3.12.0/1
    # lack zipfile's CVE-2024-0450 fix (overlapping-entry zip bombs). Exact
    # versions: constraints.txt (README, "Pinned versions").
    python_requires=">=3.11.8,!=3.12.0,!=3.12.1,<3.14",
    packages=setuptools.find_packages(
        include=["beam_pipeline", "beam_pipeline.*", "training", "training.*",
                 "schemas", "schemas.*", "busi_core", "busi_core.*",
                 "reporting", "reporting.*", "bench", "bench.*"]),
    install_requires=REQUIRED,
    extras_require=EXTRAS,
)
