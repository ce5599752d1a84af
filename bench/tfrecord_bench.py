"""TFRecord reading speed: the fail-small reader against Beam's.

- beam: what `score` read with before, `FileSystems.open` (gzip by extension,
  decompressed by Beam in large blocks) and `_TFRecordUtil.read_record`,
  which stops at the first fault;
- fail_small: `busi_core.tfrecord_io.read_file`, which inflates in small
  pieces and resynchronises on frame CRCs.

Both read the same gzip shard (written by the pipeline's own sink) and the
same plain file, of `--records` 224×224 grey speckle frames as preprocessing
stores them; MB/s counts decoded (TFRecord) bytes, medians of --repeats runs
after a warm-up, the two readers timed in alternation; the ratio is the
median of the rounds' ratios, with their range. Also reported: the bytes a record takes in a gzip shard,
grey and RGB, hence the size of a `--max_records_per_shard` shard, and how
fast the reader searches damaged bytes for the next intact frame.
"""

import argparse
import functools
import json
import os
import tempfile
from typing import Dict, List

import numpy as np

from bench import common


def _examples(count: int, image_size: int, channels: int) -> List[bytes]:
  import cv2  # pylint: disable=import-outside-toplevel
  from schemas import records  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  out = []
  for i in range(count):
    planes = [cv2.resize(common.ultrasound_like(rng, 500), (image_size,) * 2,
                         interpolation=cv2.INTER_AREA)
              for _ in range(channels)]
    pixels = planes[0] if channels == 1 else np.dstack(planes)
    out.append(records.to_example(records.ImageRecord(
        image_id=f"{i:064x}", source=f"bench://{i}", label="benign",
        pixels=pixels, original_height=500, original_width=500)))
  return out


def _write(path: str, examples: List[bytes], gzip: bool) -> int:
  """Writes a file the way the pipeline's sink does; returns its size."""
  from busi_core import tfrecord_io  # pylint: disable=import-outside-toplevel
  with open(path, "wb") as f:
    tfrecord_io.write_records(f, examples, gzip)
  return os.path.getsize(path)


def _read_beam(path: str) -> int:
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel
  from apache_beam.io.tfrecordio import _TFRecordUtil  # pylint: disable=import-outside-toplevel
  count = 0
  with FileSystems.open(path) as f:
    while _TFRecordUtil.read_record(f) is not None:
      count += 1
  return count


def _read_fail_small(path: str) -> int:
  from busi_core import tfrecord_io  # pylint: disable=import-outside-toplevel
  count = 0
  for item in tfrecord_io.read_file(path):
    assert isinstance(item, tfrecord_io.Record), item
    count += 1
  return count


def _resync_mb_per_s(workdir: str, megabytes: int, repeats: int) -> float:
  """Damaged bytes searched per second: a plain file of random bytes whose
  first frame header is corrupt, read to its end."""
  from busi_core import tfrecord_io  # pylint: disable=import-outside-toplevel
  path = os.path.join(workdir, "damaged.tfrecord")
  with open(path, "wb") as f:
    f.write(np.random.default_rng(1).bytes(megabytes << 20))

  def go():
    items = list(tfrecord_io.read_file(path))
    assert [i.error_type for i in items] == [tfrecord_io.BAD_REGION], items
  go()
  return round(megabytes * 1.048576 / common.median(
      common.timed(go, repeats), "wall_s"), 1)


def run(workdir: str, records: int = 3000, image_size: int = 224,
        repeats: int = 3, shard_records: int = 2000,
        resync_megabytes: int = 16) -> Dict:
  """Measures both readers on the same files; returns the figures.

  Args:
    workdir: scratch directory.
    records: records per file.
    image_size: height and width of the frames.
    repeats: timed reads per reader and file (medians reported).
    shard_records: --max_records_per_shard the shard size is given for.
    resync_megabytes: damaged bytes searched for the resync figure.
  """
  examples = _examples(records, image_size, 1)
  decoded_mb = sum(len(e) + 16 for e in examples) / 1e6
  figures = {"records": records, "image_size": image_size,
             "decoded_mb": round(decoded_mb, 2)}
  for name, gzip in (("gzip", True), ("plain", False)):
    path = os.path.join(workdir, f"part.tfrecord{'.gz' if gzip else ''}")
    size = _write(path, examples, gzip)
    row = {"file_mb": round(size / 1e6, 2)}
    readers = (("beam", _read_beam), ("fail_small", _read_fail_small))
    for _, read in readers:
      assert read(path) == records  # warm-up, and both read every record
    # Interleaved rounds: this machine's load moves both readers alike.
    walls = {reader: [] for reader, _ in readers}
    for _ in range(repeats):
      for reader, read in readers:
        walls[reader] += common.timed(functools.partial(read, path), 1)
    for reader, _ in readers:
      wall = common.median(walls[reader], "wall_s")
      row[f"{reader}_mb_per_s"] = round(decoded_mb / wall, 1)
      row[f"{reader}_records_per_s"] = round(records / wall)
    ratios = sorted(b["wall_s"] / f["wall_s"] for b, f in zip(
        walls["beam"], walls["fail_small"]))
    row["ratio_fail_small_to_beam"] = round(ratios[len(ratios) // 2], 3)
    row["ratio_range"] = [round(ratios[0], 3), round(ratios[-1], 3)]
    figures[name] = row
  sample = min(records, 200)
  for channels, label in ((1, "grey"), (3, "rgb")):
    path = os.path.join(workdir, f"size_{label}.tfrecord.gz")
    per_record = _write(path, _examples(sample, image_size, channels),
                        True) / sample
    figures[f"gzip_kb_per_record_{label}"] = round(per_record / 1e3, 1)
    figures[f"shard_mb_at_{shard_records}_records_{label}"] = round(
        per_record * shard_records / 1e6, 1)
  figures["resync_search_mb_per_s"] = _resync_mb_per_s(
      workdir, resync_megabytes, repeats)
  return figures


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--records", type=int, default=3000)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory(prefix="busi-bench-") as workdir:
    figures = run(workdir, args.records, args.image_size, args.repeats)
  print(json.dumps({"environment": common.environment(),
                    "tfrecord_read": figures}, indent=2))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
