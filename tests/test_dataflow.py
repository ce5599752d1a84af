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
from apache_beam.internal import pickler
from apache_beam.options.pipeline_options import (GoogleCloudOptions,
                                                  WorkerOptions)
from apache_beam.portability import common_urns
from apache_beam.portability.api import beam_runner_api_pb2

import beam_pipeline
import schemas
import training
from beam_pipeline import cli, options as opts_lib, pipeline
from tests import archive_factory as af
from tests.conftest import BUCKET
from training import testing as training_testing

# The README's recipe: one L4 with the G2 machine type it comes with.
ACCELERATOR = "type:nvidia-l4;count:1;machine_type:g2-standard-4;install-nvidia-driver"
WORKER_ACCELERATOR = "type:nvidia-l4;count:1;install-nvidia-driver"
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
  return _dry_run_job(extra).pipeline.runner.proto_pipeline


def _dry_run_argv(output):
  """`run` of the bucket's inputs as a Dataflow --dry_run into df/OUTPUT."""
  return ["run", "--input", f"gs://{BUCKET}/df/in/*.zip", "--model",
          f"gs://{BUCKET}/df/model", "--output", f"gs://{BUCKET}/df/{output}",
          "--runner", "DataflowRunner", "--dry_run=True", "--project",
          "busi-test-project", "--region", "us-central1", "--temp_location",
          f"gs://{BUCKET}/df/tmp"]


def _dry_run_job(extra):
  job = pipeline.create(_dry_run_argv("out") + ["--overwrite"] + extra)
  job.pipeline.run().wait_until_finish()
  return job


def _hints(proto, transform):
  env = proto.components.environments[transform.environment_id]
  return dict(env.resource_hints) if transform.environment_id else {}


def _inference_handlers(proto):
  """The model handlers the job's RunInference DoFns carry (unpickled)."""
  handlers = []
  for transform in proto.components.transforms.values():
    if (transform.unique_name.startswith("ScoreImages/RunInference/") and
        transform.spec.urn == common_urns.primitives.PAR_DO.urn):
      payload = beam_runner_api_pb2.ParDoPayload.FromString(
          transform.spec.payload)
      fn = pickler.loads(payload.do_fn.payload)[0]
      if hasattr(fn, "_model_handler"):
        handlers.append(fn._model_handler)  # pylint: disable=protected-access
  assert handlers, "no RunInference DoFn in the job"
  return handlers


def _experiments(job):
  return list(job.pipeline.runner.job.proto.environment.experiments)


def test_job_has_every_stage_and_gpu_only_for_inference(bucket_inputs):
  job = _dry_run_job(["--inference_accelerator", ACCELERATOR])
  proto = job.pipeline.runner.proto_pipeline
  by_name = {t.unique_name: t for t in proto.components.transforms.values()}
  for stage in STAGES:
    assert stage in by_name, f"{stage} missing from the Dataflow job"
  inference = [t for name, t in by_name.items()
               if name.startswith("ScoreImages/RunInference/")
               and t.spec.urn == common_urns.primitives.PAR_DO.urn]
  assert inference
  for transform in inference:
    hint = _hints(proto, transform).get(ACCELERATOR_URN)
    assert hint == ACCELERATOR.encode()
    # The G2 machine type travels with the GPU (an L4 exists on no other).
    assert b"machine_type:g2-standard-4" in hint
  # One model per GPU: shared by the VM's SDK processes through the handler,
  # not by running one SDK process per VM for the whole job.
  for handler in _inference_handlers(proto):
    assert handler.share_model_across_processes()
    assert handler.model_copies() == 1
  assert opts_lib.SINGLE_SDK_CONTAINER_EXPERIMENT not in _experiments(job)
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
  # CPU workers: a model per SDK process, shared by its threads.
  for handler in _inference_handlers(proto):
    assert not handler.share_model_across_processes()


def test_gpu_on_every_worker_takes_the_g2_machine_type(bucket_inputs):
  job = _dry_run_job(["--dataflow_service_options",
                      f"worker_accelerator={WORKER_ACCELERATOR}",
                      "--machine_type", "g2-standard-4"])
  proto = job.pipeline.runner.proto_pipeline
  assert not any(ACCELERATOR_URN in _hints(proto, t)
                 for t in proto.components.transforms.values())
  assert all(h.model_copies() == 1 and h.share_model_across_processes()
             for h in _inference_handlers(proto))
  submitted = job.pipeline.options
  assert submitted.view_as(WorkerOptions).machine_type == "g2-standard-4"
  assert f"worker_accelerator={WORKER_ACCELERATOR}" in submitted.view_as(
      GoogleCloudOptions).dataflow_service_options
  assert opts_lib.SINGLE_SDK_CONTAINER_EXPERIMENT not in _experiments(job)


def test_gpu_without_its_machine_type_is_refused(bucket_inputs):
  with pytest.raises(ValueError, match="g2-"):
    _dry_run(["--inference_accelerator", WORKER_ACCELERATOR])
  with pytest.raises(ValueError, match="--machine_type"):
    _dry_run(["--dataflow_service_options",
              f"worker_accelerator={WORKER_ACCELERATOR}"])


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
              f"worker_accelerator={WORKER_ACCELERATOR}"])


@pytest.mark.parametrize("flag, runner", [
    ("--input", "DataflowRunner"), ("--model", "DataflowRunner"),
    ("--output", "dataflow"), ("--skip_scored", "dataflowrunner")])
def test_a_local_path_is_refused_for_dataflow(tmp_path, capsys, flag, runner):
  # Its workers cannot see the launcher's files: refused in one line before
  # anything is built or created, even in a dry run, however the runner is
  # spelt (Beam reads its name in any case).
  argv = _dry_run_argv("out") + ["--skip_scored", f"gs://{BUCKET}/df/old"]
  argv[argv.index("--runner") + 1] = runner
  local = str(tmp_path / "local")
  argv[argv.index(flag) + 1] = local
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert (f"{flag} {local}: Dataflow's workers cannot see this machine's"
          " files; pass gs:// paths") in err, err
  assert not os.path.exists(local)


def test_a_missing_setup_file_is_refused_for_dataflow(tmp_path, capsys):
  missing = str(tmp_path / "setup.pyy")
  assert cli.main(_dry_run_argv("out") + ["--setup_file", missing]) == 2
  assert capsys.readouterr().err.endswith(
      f"error: --setup_file {missing}: no such file (pass the project's"
      " setup.py, e.g. --setup_file ./setup.py)\n")


def test_dry_run_from_the_command_line_says_no_manifest_was_written(
    bucket_inputs, capsys):
  argv = _dry_run_argv("dry")
  assert cli.main(argv) == cli.EXIT_OK
  line = capsys.readouterr().out.strip().splitlines()[-1]
  assert line.startswith("Run ") and "(run):" in line, line
  assert line.endswith("; no manifest was written"), line
  # The state is the runner's, not a missing key.
  assert ": None;" not in line, line
  # The dry run released its output: the same command runs again.
  assert cli.main(argv) == cli.EXIT_OK
