"""Shared pytest set-up: no network, no Google credentials, small data."""

import hashlib
import logging
import os
import socket

import pytest

# Keep google-auth off the metadata server: traffic may only go to loopback.
os.environ["NO_GCE_CHECK"] = "true"
os.environ["GCE_METADATA_HOST"] = "127.0.0.1"
os.environ["GCE_METADATA_IP"] = "127.0.0.1"
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


BUCKET = "busi-test"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_client():
  """A google-cloud-storage client of a GCS JSON-API emulator on loopback."""
  from gcp_storage_emulator.server import create_server
  logging.getLogger("gcp_storage_emulator").setLevel(logging.ERROR)
  port = _free_port()
  server = create_server("127.0.0.1", port, in_memory=True,
                         default_bucket=BUCKET)
  server.start()
  previous = os.environ.get("STORAGE_EMULATOR_HOST")
  os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
  try:
    from google.cloud import storage
    yield storage.Client.create_anonymous_client()
  finally:
    server.stop()
    if previous is None:
      os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
      os.environ["STORAGE_EMULATOR_HOST"] = previous


@pytest.fixture
def installed_venv():
  """The venv run_tests.sh and run_local.sh use (scripts/ensure_env.sh);
  skips a test that runs either script where that venv is missing or was
  installed from another setup.py or constraints.txt, since the script would
  first spend minutes installing it. The stamp is ensure_env.sh's: the first
  16 hex digits of the sha256 of setup.py then constraints.txt."""
  venv = os.environ.get("BUSI_VENV", os.path.join(REPO, ".venv"))
  digest = hashlib.sha256()
  for name in ("setup.py", "constraints.txt"):
    with open(os.path.join(REPO, name), "rb") as f:
      digest.update(f.read())
  stamp = os.path.join(venv, ".busi-installed-" + digest.hexdigest()[:16])
  if not os.path.exists(stamp):
    pytest.skip("the script would install its venv first: none, or one from"
                " another setup.py or constraints.txt (run_tests.sh installs"
                " it)")
  return venv


@pytest.fixture
def fake_model(monkeypatch):
  """Scoring runs in this test use the numpy FakeModel (tests/fakes.py)
  instead of the artifact's Keras model; the artifact's files are still read
  and checked at launch. Fails the test if no image reached the fake (the
  seam moved and the real model scored instead)."""
  from beam_pipeline import model_handler
  from tests import fakes
  monkeypatch.setattr(model_handler, "keyed_handler", fakes.keyed_handler)
  before = fakes.CALLS.images
  yield fakes
  assert fakes.CALLS.images > before, (
      "the fake model scored nothing: does ScoreImages still call"
      " beam_pipeline.model_handler.keyed_handler?")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
  """A tiny real artifact (16×16 input) shared by the pipeline tests; its
  launch-time checks are real even where a fake model scores."""
  from training import testing as training_testing  # pylint: disable=import-outside-toplevel
  path = str(tmp_path_factory.mktemp("model"))
  training_testing.make_test_artifact(path, image_size=16)
  return path


@pytest.fixture(autouse=True)
def float32_training(monkeypatch):
  """--training_precision auto resolves to float32 (and --fine_tune_epochs
  auto to 0) in tests whatever the CPU or GPU, so that their figures do not depend on the machine's bfloat16
  instructions; tests of bfloat16 ask for it, and tests of "auto" patch the
  CPU flags themselves."""
  from busi_core import precision
  from training import model
  monkeypatch.setattr(precision, "cpu_bfloat16_flags", lambda *args: ())
  monkeypatch.setattr(model, "_gpu_bfloat16", lambda: None)
