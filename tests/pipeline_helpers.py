"""Helpers for tests that run pipelines and read their outputs back."""

import glob
import hashlib
import json
import os
from typing import Dict, List

import duckdb
from apache_beam.testing.test_pipeline import TestPipeline

import schemas
import schemas.manifest
from busi_core import tfrecord_io
from schemas import records

# Beam's DirectRunner would first try Prism, which downloads a binary; tests
# run in-process on the FnApiRunner, as `run()` does for local runs.
RUNNER = "FnApiRunner"


def make_test_pipeline() -> TestPipeline:
  return TestPipeline(runner=RUNNER)


def read_records(output_dir: str) -> List[records.ImageRecord]:
  files = sorted(glob.glob(os.path.join(output_dir, schemas.TFRECORD_DIR,
                                        "*" + schemas.TFRECORD_SUFFIX)))
  assert files, f"no TFRecords under {output_dir}"
  items = [item for f in files for item in tfrecord_io.read_file(f)]
  damages = [i for i in items if isinstance(i, tfrecord_io.Damage)]
  assert not damages, damages
  return [records.from_example(i.payload) for i in items]


def sql(query: str) -> List[tuple]:
  return duckdb.connect().execute(query).fetchall()


def read_errors(output_dir: str) -> List[Dict]:
  pattern = os.path.join(output_dir, schemas.ERRORS_DIR, "*.parquet")
  con = duckdb.connect()
  cur = con.execute(f"SELECT * FROM read_parquet('{pattern}')")
  names = [d[0] for d in cur.description]
  return [dict(zip(names, row)) for row in cur.fetchall()]


def pixel_digest(record: records.ImageRecord) -> str:
  return hashlib.sha256(record.pixels.tobytes()).hexdigest()


def _spelled(prefix: str) -> set:
  return {value for name, value in vars(schemas.manifest).items()
          if name.startswith(prefix) and isinstance(value, str)}


def assert_manifest_spelled_in_schemas(output_dir: str) -> Dict:
  """The manifest on disk, checked: every field, count and flag-rate
  sub-field it holds is one that `schemas.manifest` spells."""
  with open(os.path.join(output_dir, schemas.MANIFEST_FILE)) as f:
    manifest = json.load(f)
  unknown = set(manifest) - _spelled("MANIFEST_")
  assert not unknown, f"manifest fields not in schemas.manifest: {unknown}"
  unknown = set(manifest[schemas.MANIFEST_COUNTS]) - _spelled("COUNT_")
  assert not unknown, f"counts not in schemas.manifest: {unknown}"
  assert set(manifest[schemas.MANIFEST_INVARIANT]) == {
      schemas.INVARIANT_RULE, schemas.INVARIANT_HOLDS}
  if schemas.MANIFEST_SKIP_SCORED in manifest:
    assert set(manifest[schemas.MANIFEST_SKIP_SCORED]) == {
        schemas.SKIP_SCORED_GLOBS, schemas.SKIP_SCORED_RUNS}
  for entry in manifest.get(schemas.MANIFEST_FLAG_RATES, {}).values():
    unknown = set(entry) - _spelled("FLAG_RATE_")
    assert not unknown, f"flag-rate fields not in schemas.manifest: {unknown}"
  return manifest
