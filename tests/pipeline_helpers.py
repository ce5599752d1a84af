"""Helpers for tests that run pipelines and read their outputs back."""

import glob
import hashlib
import os
from typing import Dict, List

import duckdb
from apache_beam.testing.test_pipeline import TestPipeline

import schemas
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
