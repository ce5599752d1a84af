"""The Dataflow job, built offline with `--dry_run=True` and inspected.

Inputs, model and outputs live in the loopback storage emulator, which is
what lets the launcher validate them and stage without a Google account.
"""

import base64
import bz2
import os
import zlib

import numpy as np
import pytest
from apache_beam.portability import common_urns
from apache_beam.portability.api import beam_runner_api_pb2

import beam_pipeline
import schemas
import training
from beam_pipeline import pipeline
from tests import archive_factory as af
from tests.conftest import BUCKET
from training import testing as training_testing

ACCELERATOR = "type:nvidia-l4;count:1;install-nvidia-driver"
ACCELERATOR_URN = "beam:resources:accelerator:v1"
STAGES = ("ReadImages/PlanWork", "ReadImages/ReadTars",
          "ReadImages/SpreadWork", "ReadImages/ReadMembers",
          "ReadImages/DecodeImages", "WriteExamples/WriteTFRecords",
          "ParseExamples", "ScoreImages/ToModelInput",
          "ScoreImages/RunInference", "ScoreImages/ToRows",
          "WritePredictions", "WriteErrors", "Manifest/WriteManifest")
# Slow set: a storage server and a full Dataflow translation per test.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bucket_inputs(gcs_client, tmp_path_factory):
  local = tmp_path_factory.mktemp("dataflow")
  rng = np.random.default_rng(0)
  entries = [af.Entry(f"Dataset_BUSI_with_GT/{cls}/{cls} (1).png",
                      af.png(af.speckle(rng, 20, 20)), "image", cls)
             for cls in schemas.LABELS]
  af.write_zip(str(local / "d.zip"), entries)
  bucket = gcs_client.bucket(BUCKET)
  bucket.blob("df/in/d.zip").upload_from_filename(str(local / "d.zip"))
  model_dir = local / "model"
  training_testing.make_test_artifact(str(model_dir), image_size=32)
  for name in os.listdir(model_dir):
    bucket.blob(f"df/model/{name}").upload_from_filename(
        str(model_dir / name))
  return str(local)


def _dry_run(extra):
  argv = ["run", "--input", f"gs://{BUCKET}/df/in/*.zip", "--model",
          f"gs://{BUCKET}/df/model", "--output", f"gs://{BUCKET}/df/out",
          "--runner", "DataflowRunner", "--dry_run=True", "--project",
          "busi-test-project", "--region", "us-central1", "--temp_location",
          f"gs://{BUCKET}/df/tmp", "--overwrite"] + extra
  job = pipeline.create(argv)
  job.pipeline.run().wait_until_finish()
  return job.pipeline.runner.proto_pipeline


def _hints(proto, transform):
  env = proto.components.environments[transform.environment_id]
  return dict(env.resource_hints) if transform.environment_id else {}


def test_job_has_every_stage_and_gpu_only_for_inference(bucket_inputs):
  proto = _dry_run(["--inference_accelerator", ACCELERATOR])
  by_name = {t.unique_name: t for t in proto.components.transforms.values()}
  for stage in STAGES:
    assert stage in by_name, f"{stage} missing from the Dataflow job"
  inference = [t for name, t in by_name.items()
               if name.startswith("ScoreImages/RunInference/")
               and t.spec.urn == common_urns.primitives.PAR_DO.urn]
  assert inference
  for transform in inference:
    assert _hints(proto, transform).get(ACCELERATOR_URN) == (
        ACCELERATOR.encode())
  for name in ("ReadImages/DecodeImages", "ReadImages/ReadMembers",
               "WritePredictions/WriteParquet"):
    leaves = [t for n, t in by_name.items() if n.startswith(name)
              and t.spec.urn == common_urns.primitives.PAR_DO.urn]
    assert leaves and all(ACCELERATOR_URN not in _hints(proto, t)
                          for t in leaves), name


def test_no_accelerator_unless_asked(bucket_inputs):
  proto = _dry_run([])
  assert not any(ACCELERATOR_URN in _hints(proto, t)
                 for t in proto.components.transforms.values())


def _unpickle_bytes(blob: bytes) -> bytes:
  """Beam's pickled DoFns: base64 of a bz2 (or zlib) compressed pickle."""
  raw = base64.b64decode(blob)
  for decompress in (bz2.decompress, zlib.decompress):
    try:
      return decompress(raw)
    except (OSError, ValueError, zlib.error):
      continue
  raise AssertionError(f"cannot read pickled payload {blob[:16]!r}")


def _pickled_payloads(proto):
  for transform in proto.components.transforms.values():
    if transform.spec.urn == common_urns.primitives.PAR_DO.urn:
      payload = beam_runner_api_pb2.ParDoPayload.FromString(
          transform.spec.payload)
      yield transform.unique_name, _unpickle_bytes(payload.do_fn.payload)
    else:
      yield transform.unique_name, transform.spec.payload


def test_pickled_job_has_no_local_paths(bucket_inputs):
  proto = _dry_run(["--inference_accelerator", ACCELERATOR])
  local_paths = [bucket_inputs, os.path.dirname(beam_pipeline.__file__),
                 os.path.dirname(training.__file__), os.getcwd() + "/tests"]
  checked = 0
  for name, raw in _pickled_payloads(proto):
    checked += 1
    for path in local_paths:
      assert path.encode() not in raw, f"{name} refers to local {path}"
  assert checked > 50
  # The paths the job does carry are the bucket's.
  everything = b"".join(raw for _, raw in _pickled_payloads(proto))
  assert f"gs://{BUCKET}/df/model".encode() in everything


def test_gpu_hint_and_worker_accelerator_are_exclusive(bucket_inputs):
  with pytest.raises(ValueError, match="exclusive"):
    _dry_run(["--inference_accelerator", ACCELERATOR,
              "--dataflow_service_options",
              f"worker_accelerator={ACCELERATOR}"])
