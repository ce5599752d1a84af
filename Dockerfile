# GPU worker image for Dataflow: CUDA + TensorFlow + this project, started by
# the Beam SDK's boot entrypoint.
#
#   docker build -t REGION-docker.pkg.dev/PROJECT/REPO/busi-worker:0.1.0 .
#   docker push REGION-docker.pkg.dev/PROJECT/REPO/busi-worker:0.1.0
#   ... --sdk_container_image REGION-docker.pkg.dev/PROJECT/REPO/busi-worker:0.1.0
#
# Beam and Python versions must match the launcher's: every version comes
# from constraints.txt (pip install -c), and tests/test_pins.py checks that
# BEAM_VERSION equals its apache-beam pin and PYTHON_VERSION the Python it was
# frozen on. CUDA and cuDNN come from TensorFlow's `and-cuda` wheels (pinned
# there too); the NVIDIA driver is installed on the VM by Dataflow
# (`install-nvidia-driver` in the accelerator option).
ARG PYTHON_VERSION=3.11
ARG BEAM_VERSION=2.77.0

FROM apache/beam_python${PYTHON_VERSION}_sdk:${BEAM_VERSION} AS beam_sdk

FROM python:${PYTHON_VERSION}-slim-bookworm
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TF_ENABLE_ONEDNN_OPTS=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    TF_FORCE_GPU_ALLOW_GROWTH=true
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/busi
# TensorFlow with its CUDA libraries first: a code change does not reinstall it.
COPY constraints.txt ./
RUN pip install -c constraints.txt "tensorflow[and-cuda]" "apache-beam[gcp]"
COPY setup.py ./
COPY schemas schemas
COPY busi_core busi_core
COPY reporting reporting
COPY beam_pipeline beam_pipeline
COPY training training
COPY bench bench
RUN pip install -c constraints.txt . && python -c "import beam_pipeline, busi_core, reporting, training, schemas, apache_beam, tensorflow"
# Smoke step: `doctor` is also the first command to run in this image on a
# GPU worker (README, "Check the worker image"). Here, without a GPU, it
# prints TensorFlow's CUDA/cuDNN build and devices, then loads a tiny
# artifact exactly as scoring does and times it.
RUN smoke="$(mktemp -d)" \
 && python -c "import sys; from training import testing; testing.make_test_artifact(sys.argv[1], image_size=32)" "$smoke/model" \
 && python -m beam_pipeline doctor --model "$smoke/model" --batch_size 8 --batches 2 \
 && rm -rf "$smoke"

# The Beam SDK harness: the entrypoint Dataflow starts in every container.
COPY --from=beam_sdk /opt/apache/beam /opt/apache/beam
ENTRYPOINT ["/opt/apache/beam/boot"]
