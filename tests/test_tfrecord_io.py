"""TFRecord shards fail small: byte flips and cuts in generated shards cost
the records they hit, every loss is an error row, and `score` says when a
shard could not be read whole."""

import glob
import io
import json
import os
import time
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import schemas
from beam_pipeline import cli, options, pipeline
from busi_core import tfrecord_io
from schemas import records as records_lib
from tests import archive_factory as af
from tests.pipeline_helpers import read_errors
from training import testing as training_testing

SIZE = 16


def _examples(count, seed=0):
  """Serialized Examples of low-entropy 16×16 images: compressible, so that
  deflate codes them with Huffman tables, where a flipped byte breaks the
  stream (random pixels would be stored blocks, where it does not)."""
  rng = np.random.default_rng(seed)
  return [records_lib.to_example(training_testing.make_record(
      rng.integers(0, 12, (SIZE, SIZE, 3), dtype=np.uint8), "benign",
      source=f"test.zip!/benign/{i}.png")) for i in range(count)]


EXAMPLES = _examples(30)


def _plain(payloads=EXAMPLES) -> bytes:
  f = io.BytesIO()
  tfrecord_io.write_records(f, payloads, gzip=False)
  return f.getvalue()


def _gzip(data: bytes, level: int = 6) -> bytes:
  compressor = zlib.compressobj(level, zlib.DEFLATED, 31)
  return compressor.compress(data) + compressor.flush()


def _frame_ends(payloads=EXAMPLES):
  return np.cumsum([len(p) + 16 for p in payloads])


def _frame_start(index, payloads=EXAMPLES):
  return int(sum(len(p) + 16 for p in payloads[:index]))


def _flip(data: bytes, at: int, mask: int = 0x10) -> bytes:
  out = bytearray(data)
  out[at] ^= mask
  return bytes(out)


def _read(data: bytes, name: str = "part.tfrecord"):
  items = list(tfrecord_io.read_records(io.BytesIO(data), name))
  records = {i.index: i.payload for i in items
             if isinstance(i, tfrecord_io.Record)}
  damages = [i for i in items if isinstance(i, tfrecord_io.Damage)]
  return records, damages


def _hard_break(gz: bytes) -> int:
  """An offset past the middle where one flipped byte breaks the deflate
  stream itself (not only the trailer's check)."""
  for at in range(len(gz) // 2, len(gz) - 8):
    try:
      zlib.decompress(_flip(gz, at), 31)
    except zlib.error as e:
      if "check" not in str(e):
        return at
  raise AssertionError("no flip breaks the stream")


def _decodable_before(gz: bytes, at: int) -> int:
  """Decoded bytes that the compressed bytes before `at` determine."""
  inflater = zlib.decompressobj(31)
  return len(inflater.decompress(gz[:at]))


# --- the codec ---------------------------------------------------------------


def test_frames_are_tensorflows(tmp_path):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  path = str(tmp_path / "tf.tfrecord")
  with tf.io.TFRecordWriter(path) as writer:
    for example in EXAMPLES[:5]:
      writer.write(example)
  assert open(path, "rb").read() == _plain(EXAMPLES[:5])
  gz = str(tmp_path / "tf.tfrecord.gz")
  with tf.io.TFRecordWriter(gz, options="GZIP") as writer:  # TF's own gzip
    for example in EXAMPLES[:5]:
      writer.write(example)
  records, damages = _read(open(gz, "rb").read(), gz)
  assert list(records.values()) == EXAMPLES[:5] and not damages
  ours = str(tmp_path / "ours.tfrecord.gz")
  with open(ours, "wb") as f:
    tfrecord_io.write_records(f, EXAMPLES[:5])
  assert [r.numpy() for r in tf.data.TFRecordDataset(
      ours, compression_type="GZIP")] == EXAMPLES[:5]


def test_header_search_finds_exactly_the_valid_headers():
  rng = np.random.default_rng(3)
  data = bytearray(rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes())
  data[5000:7000] = bytes(2000)  # a zeroed sector
  planted = [100, 4321, 6000, 19_000]
  for at in planted:
    length = bytes(rng.integers(0, 256, 3, dtype=np.uint8)) + bytes(5)
    data[at:at + 12] = length + tfrecord_io._CRC.pack(  # pylint: disable=protected-access
        tfrecord_io.masked_crc32c(length))
  found = list(tfrecord_io._header_offsets(bytes(data)))  # pylint: disable=protected-access
  assert found == planted
  assert tfrecord_io.masked_crc32c(bytes(8)) != 0  # zero runs are skipped


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("where", [12 + 40, 0, 3, 8, 11],
                         ids=["data", "length_low", "length", "length_crc",
                              "length_crc_high"])
def test_one_flipped_byte_costs_one_record(compress, where):
  # `data`: framing intact, the data CRC fails. The others hit the length or
  # its CRC: the reader resynchronises, and the skipped bytes are provably
  # one frame. (gzip: a valid stream of corrupted frames.)
  data = _flip(_plain(), _frame_start(7) + where)
  records, damages = _read(_gzip(data) if compress else data,
                           "part.tfrecord" + (".gz" if compress else ""))
  assert [(d.index, d.error_type, d.unread) for d in damages] == [
      (7, tfrecord_io.BAD_RECORD, False)]
  assert "record 7" in damages[0].message
  assert records == {i: e for i, e in enumerate(EXAMPLES) if i != 7}


def test_two_faults_in_a_row_are_two_bad_records():
  data = _flip(_flip(_plain(), _frame_start(5) + 2), _frame_start(6) + 50)
  records, damages = _read(data)
  assert [(d.index, d.error_type, d.unread) for d in damages] == [
      (5, tfrecord_io.BAD_RECORD, False), (6, tfrecord_io.BAD_RECORD, False)]
  assert records == {i: e for i, e in enumerate(EXAMPLES) if i not in (5, 6)}


def test_damaged_region_of_unknown_size_is_skipped():
  data = bytearray(_plain())
  start = _frame_start(10) + 5
  del data[start:_frame_start(12) + 30]  # one and a bit frames gone
  records, damages = _read(bytes(data))
  assert [(d.index, d.error_type, d.unread) for d in damages] == [
      (10, tfrecord_io.BAD_REGION, True)]
  assert f"offset {_frame_start(10)}" in damages[0].message
  # After the region, the reader's indices count it as one.
  assert list(records.values()) == EXAMPLES[:10] + EXAMPLES[13:]


@pytest.mark.parametrize("what, name", [
    ("a zip archive", "scans.zip"), ("a tar archive", "scans.tar.gz"),
    ("a PNG image", "scan.png"), ("a DICOM file", "scan.dcm")])
def test_an_input_of_preprocess_says_what_it_is(tmp_path, what, name):
  """An archive, an image or a DICOM passed where TFRecords go: the damage
  starts by saying what the file is and what to run first."""
  import cv2  # pylint: disable=import-outside-toplevel
  import tarfile  # pylint: disable=import-outside-toplevel
  from pydicom.data import get_testdata_file  # pylint: disable=import-outside-toplevel
  noise = np.random.default_rng(0).integers(0, 256, (80, 80), np.uint8)
  png = cv2.imencode(".png", noise)[1].tobytes()
  if name.endswith(".zip"):
    af.write_zip(str(tmp_path / name), af.busi_entries(1))
    data = (tmp_path / name).read_bytes()
  elif name.endswith(".tar.gz"):
    with tarfile.open(tmp_path / name, "w:gz") as tar:
      (tmp_path / "a.png").write_bytes(png)
      tar.add(tmp_path / "a.png", "benign/a.png")
    data = (tmp_path / name).read_bytes()
  elif name.endswith(".png"):
    data = png
  else:
    with open(get_testdata_file("CT_small.dcm"), "rb") as f:
      data = f.read()
  records, damages = _read(data, name)
  assert not records
  assert [(d.index, d.error_type) for d in damages] == [
      (0, tfrecord_io.BAD_REGION)]
  assert damages[0].message.startswith(
      f"the file is {what}, not TFRecords: preprocess it first"
      " (`python -m beam_pipeline preprocess`, or `run` to preprocess and"
      " score in one job) and pass its DIR/tfrecords/*.tfrecord.gz; "), (
          damages[0].message)
  # It is not scanned for records: nothing past its head is read (the BUSI
  # zip is ~195 MB), however long it is.
  assert damages[0].message.endswith("; nothing in it was read")
  handle = io.BytesIO(data + os.urandom(8 << 20))
  damages = list(tfrecord_io.read_records(handle, name))
  assert len(damages) == 1 and damages[0].message.startswith(
      f"the file is {what}, not TFRecords"), damages
  assert handle.tell() < len(data) + (4 << 20)
  # Damage elsewhere, or bytes that are nothing known, say only what was lost.
  _, damages = _read(b"not a record at all" * 10)
  assert damages[0].message.startswith("190 bytes from offset 0")


def test_compressed_tfrecords_are_told_to_decompress_and_bm_is_scanned():
  import lzma  # pylint: disable=import-outside-toplevel
  plain = io.BytesIO()
  tfrecord_io.write_records(plain, EXAMPLES[:3], gzip=False)
  records, damages = _read(lzma.compress(plain.getvalue()), "a.tfrecord.xz")
  assert not records and damages[0].message.startswith(
      "the file is xz-compressed, not TFRecords: they are read plain or gzip;"
      " decompress it"), damages[0].message
  # "BM" (a BMP's two-byte signature) may open a damaged record as well: it
  # is read as one, and the intact records after it are kept.
  data = plain.getvalue()
  records, damages = _read(b"BM" + data[2:], "a.tfrecord")
  assert len(records) == 2 and damages[0].message.startswith(
      "record 0 ("), damages[0].message
  assert damages[0].message.endswith("length field corrupt (CRC32C"
                                     " mismatch); skipped")


def test_absurd_length_is_corruption_not_an_allocation():
  length = (1 << 40).to_bytes(8, "little")
  header = length + tfrecord_io._CRC.pack(tfrecord_io.masked_crc32c(length))  # pylint: disable=protected-access
  records, damages = _read(header + b"x" * 100 + _plain(EXAMPLES[:3]))
  assert [(d.error_type, d.unread) for d in damages] == [
      (tfrecord_io.BAD_REGION, True)]
  assert list(records.values()) == EXAMPLES[:3]


def test_a_file_of_false_headers_is_searched_in_one_pass():
  # Every 12 bytes a header that holds and declares 50 MiB: hostile bytes
  # must cost one pass, not one 50 MiB read or CRC per offset.
  length = (50 << 20).to_bytes(8, "little")
  header = length + tfrecord_io._CRC.pack(tfrecord_io.masked_crc32c(length))  # pylint: disable=protected-access
  started = time.perf_counter()
  records, damages = _read(b"x" + header * 100_000)
  assert time.perf_counter() - started < 20
  assert not records
  assert [(d.error_type, d.unread) for d in damages] == [
      (tfrecord_io.BAD_REGION, True)]


def test_broken_gzip_stream_keeps_every_record_before_the_break():
  gz = _gzip(_plain())
  at = _hard_break(gz)
  records, damages = _read(_flip(gz, at), "part.tfrecord.gz")
  kept = int(np.sum(_frame_ends() <= _decodable_before(gz, at)))
  assert 0 < kept < len(EXAMPLES)
  assert all(records.get(i) == EXAMPLES[i] for i in range(kept))
  assert len(records) < len(EXAMPLES)
  assert damages[-1].error_type == tfrecord_io.BAD_FILE
  assert damages[-1].unread and "gzip stream broken" in damages[-1].message
  assert all(d.error_type != tfrecord_io.BAD_FILE for d in damages[:-1])


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_file_cut_short_keeps_what_came_before(compress):
  plain = _plain()
  data = _gzip(plain) if compress else plain
  cut = len(data) // 2
  records, damages = _read(data[:cut], "p" + (".gz" if compress else ""))
  decoded = _decodable_before(data, cut) if compress else cut
  kept = int(np.sum(_frame_ends() <= decoded))
  assert records == dict(enumerate(EXAMPLES[:kept]))
  assert [(d.index, d.error_type, d.unread) for d in damages] == [
      (kept, tfrecord_io.BAD_FILE, True)]
  assert "cut short" in damages[0].message


@pytest.mark.parametrize("name", ["a.tfrecord", "a.tfrecord.gz"])
def test_the_bytes_decide_gzip_or_plain(name):
  for data in (_plain(), _gzip(_plain())):
    assert _read(data, name) == (dict(enumerate(EXAMPLES)), [])


def test_gzip_members_padding_and_a_bad_trailer_lose_nothing():
  plain = _plain()
  multi = _gzip(plain[:1000]) + b"\0" * 7 + _gzip(plain[1000:])
  assert _read(multi, "p.gz") == (dict(enumerate(EXAMPLES)), [])
  gz = _gzip(plain)
  for at in (len(gz) - 6, len(gz) - 2):  # its CRC-32, then its length
    # Every record carries its own CRC: a bad trailer alone loses nothing.
    assert _read(_flip(gz, at), "p.gz") == (dict(enumerate(EXAMPLES)), [])
  # A flipped byte whose deflate stream still decodes: one record, found
  # by its CRC; the trailer check then fails, and nothing more is lost.
  stored = _gzip(plain, level=0)  # one stored block: 10 + 5 header bytes
  records, damages = _read(_flip(stored, 10 + 5 + _frame_start(4) + 30),
                           "p.gz")
  assert [(d.index, d.error_type) for d in damages] == [
      (4, tfrecord_io.BAD_RECORD)]
  assert len(records) == len(EXAMPLES) - 1


def test_empty_files():
  assert _read(b"", "p.tfrecord") == ({}, [])
  _, damages = _read(b"", "p.tfrecord.gz")
  assert [(d.error_type, d.unread) for d in damages] == [
      (tfrecord_io.BAD_FILE, True)]


class _FailingFile(io.BytesIO):

  def read(self, size=-1):
    if self.tell() > 2000:
      raise OSError("connection reset")
    return super().read(min(size, 1000))


def test_a_failed_read_keeps_the_records_before_it():
  items = list(tfrecord_io.read_records(_FailingFile(_plain()), "p"))
  assert isinstance(items[0], tfrecord_io.Record)
  assert items[-1].error_type == tfrecord_io.BAD_FILE
  assert "connection reset" in items[-1].message


_SHARDS = {"plain": _plain(EXAMPLES[:12]), "gzip": _gzip(_plain(EXAMPLES[:12]))}


@settings(max_examples=150, deadline=5000,
          suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(sorted(_SHARDS)),
       flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 255)),
                      max_size=6),
       cut=st.integers(0, 3000))
def test_fuzzed_shards_never_raise_and_never_lose_silently(kind, flips, cut):
  data = bytearray(_SHARDS[kind])
  for at, mask in flips:
    data[at % len(data)] ^= mask
  if kind == "gzip":  # a plain file cut at a frame boundary is undetectable
    data = data[:max(0, len(data) - cut)]
  records, damages = _read(bytes(data), "p.tfrecord" + (
      ".gz" if kind == "gzip" else ""))
  # Every record yielded is one that was written (its CRCs held) ...
  assert set(records.values()) <= set(EXAMPLES[:12])
  # ... and any record missing has an error row to show for it.
  if len(records) < 12:
    assert damages


# --- through the pipeline ----------------------------------------------------


def _manifest(out):
  return json.load(open(os.path.join(out, schemas.MANIFEST_FILE)))


def test_score_keeps_every_intact_record(tmp_path, model_dir, fake_model):
  (tmp_path / "in").mkdir()
  data = _flip(_plain(), _frame_start(7) + 40)  # inside record 7's data
  (tmp_path / "in" / "a.tfrecord").write_bytes(data)
  (tmp_path / "in" / "b.tfrecord.gz").write_bytes(
      _gzip(_flip(_plain(), _frame_start(3) + 4)))  # record 3's length
  out = str(tmp_path / "out")
  manifest = pipeline.run(["score", "--input", str(tmp_path / "in" / "*"),
                           "--model", model_dir, "--output", out])
  errors = read_errors(out)
  assert sorted((os.path.basename(e["source"]), e["error_type"])
                for e in errors) == [("a.tfrecord#7", "BadRecord"),
                                     ("b.tfrecord.gz#3", "BadRecord")]
  counts = manifest["counts"]
  assert counts["predictions"] == 2 * len(EXAMPLES) - 2
  assert counts[schemas.COUNT_SHARDS_UNREAD] == 0
  assert counts["members_seen"] == 2 * len(EXAMPLES)
  assert manifest["invariant"]["holds"] and manifest["complete"]


def test_broken_shards_make_score_incomplete_exit_5(tmp_path, model_dir,
                                                    fake_model):
  (tmp_path / "in").mkdir()
  gz = _gzip(_plain())
  at = _hard_break(gz)
  (tmp_path / "in" / "broken.tfrecord.gz").write_bytes(_flip(gz, at))
  (tmp_path / "in" / "cut.tfrecord").write_bytes(_plain()[:3000])
  (tmp_path / "in" / "good.tfrecord.gz").write_bytes(gz)
  out = str(tmp_path / "out")
  status = cli.main(["score", "--input", str(tmp_path / "in" / "*"),
                     "--model", model_dir, "--output", out])
  assert status == cli.EXIT_INCOMPLETE
  manifest = _manifest(out)
  counts = manifest["counts"]
  assert counts[schemas.COUNT_SHARDS_UNREAD] == 2
  assert manifest["invariant"]["holds"] and not manifest["complete"]
  assert manifest["incomplete_because"] == {schemas.COUNT_SHARDS_UNREAD: 2}
  errors = read_errors(out)
  files = [os.path.basename(e["source"]).split("#")[0] for e in errors
           if e["error_type"] == "BadTFRecordFile"]
  assert sorted(files) == ["broken.tfrecord.gz", "cut.tfrecord"]
  kept = int(np.sum(_frame_ends() <= _decodable_before(gz, at)))
  cut_kept = int(np.sum(_frame_ends() <= 3000))
  assert counts["predictions"] >= len(EXAMPLES) + kept + cut_kept
  assert counts["members_seen"] == counts["predictions"] + counts["errors"]


def test_preprocess_writes_bounded_shards(tmp_path):
  rng = np.random.default_rng(5)
  entries = [af.Entry(f"benign/{i}.png", af.png(af.speckle(rng, 20, 20)),
                      "image", "benign") for i in range(7)]
  af.write_zip(str(tmp_path / "a.zip"), entries)
  out = str(tmp_path / "out")
  manifest = pipeline.run(["preprocess", "--input", str(tmp_path / "a.zip"),
                           "--output", out, "--image_size", str(SIZE),
                           "--max_records_per_shard", "2"])
  shards = glob.glob(os.path.join(out, schemas.TFRECORD_DIR,
                                  "*" + schemas.TFRECORD_SUFFIX))
  per_shard = [[records_lib.from_example(r.payload).source
                for r in tfrecord_io.read_file(shard)] for shard in shards]
  assert len(shards) >= 4 and all(len(s) <= 2 for s in per_shard)
  sources = sorted(s for shard in per_shard for s in shard)
  assert len(sources) == len(set(sources)) == 7
  assert manifest["counts"]["images_written"] == 7


def test_max_records_per_shard_is_validated(tmp_path):
  (tmp_path / "a.zip").write_bytes(b"")
  opts = options.PipelineOptions(["--input", str(tmp_path / "a.zip"),
                                  "--output", str(tmp_path / "o"),
                                  "--max_records_per_shard", "0"])
  with pytest.raises(ValueError, match="--max_records_per_shard"):
    options.validate(options.PREPROCESS, opts)
  assert options.PipelineOptions([]).view_as(
      options.BusiOptions).max_records_per_shard == (
          options.DEFAULT_MAX_RECORDS_PER_SHARD)
