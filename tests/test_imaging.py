"""Unit tests of the per-element image functions (no runner)."""

import pickle

import numpy as np
import pytest

import schemas
from busi_core import imaging
from busi_core.errors import MemberError
from schemas import records
from tests import archive_factory as af


@pytest.mark.parametrize("path,expected", [
    ("Dataset_BUSI_with_GT/benign/benign (1)_mask.png", True),
    ("Dataset_BUSI_with_GT/benign/benign (1)_mask_1.png", True),
    ("x/malignant (3)_MASK.png", True),
    ("Dataset_BUSI_with_GT/benign/benign (1).png", False),
    ("masks/benign (1).png", False),
    ("x/mask_of_doom.png", False),
])
def test_is_mask(path, expected):
  assert imaging.is_mask(path) is expected


@pytest.mark.parametrize("path,expected", [
    ("Dataset_BUSI_with_GT/benign/benign (1).png", "benign"),
    ("Dataset_BUSI_with_GT/Malignant/x.png", "malignant"),
    ("normal/deeper/x.png", "normal"),
    ("benign/malignant/x.png", "malignant"),  # deepest class folder wins
    ("export/benign.png", ""),  # the file name is not a folder
    ("x.png", ""),
])
def test_label_from_path(path, expected):
  assert imaging.label_from_path(path) == expected


@pytest.mark.parametrize("index", range(7))
def test_decode_matches_opencv(index):
  images = [e for e in af.mixed_entries() if e.fate == "image"]
  entry = images[index % len(images)]
  decoded = imaging.decode_and_resize(entry.data, 24)
  assert decoded.pixels.dtype == np.uint8
  assert decoded.pixels.shape == (24, 24, 3)
  np.testing.assert_array_equal(decoded.pixels,
                                af.expected_pixels(entry.data, 24))


def test_decode_reports_original_size():
  rng = np.random.default_rng(1)
  decoded = imaging.decode_and_resize(af.png(af.speckle(rng, 37, 91)), 16)
  assert (decoded.original_height, decoded.original_width) == (37, 91)


def test_grey_is_replicated_and_16bit_scaled():
  grey16 = np.full((8, 8), 65535, np.uint16)
  grey16[:4] = 257 * 10
  pixels = imaging.decode_and_resize(af.png(grey16), 8).pixels
  assert (pixels[:4] == 10).all() and (pixels[4:] == 255).all()
  assert (pixels[..., 0] == pixels[..., 2]).all()


def test_rgba_drops_alpha_and_swaps_to_rgb():
  bgra = np.zeros((4, 4, 4), np.uint8)
  bgra[..., 0] = 200  # blue in OpenCV's BGRA
  bgra[..., 3] = 0  # fully transparent: alpha must not matter
  pixels = imaging.decode_and_resize(af.png(bgra), 4).pixels
  assert (pixels[..., 2] == 200).all() and (pixels[..., :2] == 0).all()


@pytest.mark.parametrize("data,kind", [
    (b"", "EmptyFile"),
    (b"hello world, not an image", "NotAnImage"),
    (b"%PDF-1.4 ...", "NotAnImage"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 10, "CorruptImage"),
])
def test_decode_errors(data, kind):
  with pytest.raises(MemberError) as err:
    imaging.decode_and_resize(data, 8)
  assert err.value.kind == kind


@pytest.mark.parametrize("data", [
    b"DOE^JANE MRN123456",
    "\ufeffDOE^JANE MRN123456".encode(),  # UTF-8 with a byte-order mark
    "MÜLLER^HANS".encode(),  # UTF-8, accented
    "AÉÉÉÉ".encode(),  # UTF-8, a character cut at the 8th byte
    "DOE\u00a0JANE".encode(),  # a no-break space, as word processors write
    "MÜLLER^HANS".encode("latin-1"), "MÜLLER^HANS".encode("cp1252"),
    b"abcd\xe4fgh", b"\x0cpage two",  # Latin-1; a form feed first
    "DOE^JANE".encode("utf-16"),  # with its byte-order mark
    "DOE^JANE".encode("utf-16-le"), "DOE^JANE".encode("utf-16-be"),
    "MÜLLER".encode("utf-16-le"), "ИВАНОВ".encode("utf-16-le"),  # no mark
    "DOE^JANE".encode("utf-32"), "MÜLLER".encode("utf-32-le"),
    "山田^太郎".encode("shift_jis"), "山田^太郎".encode("iso-2022-jp"),
])
def test_text_is_never_quoted_in_an_error(data):
  # A stray report in a hospital archive may open with a patient's name: the
  # message says it is text, not its bytes (in hex or otherwise).
  with pytest.raises(MemberError) as err:
    imaging.decode_and_resize(data, 8)
  assert str(err.value).endswith(
      f"(starts with {min(len(data), 8)} bytes of text)"), str(err.value)


@pytest.mark.parametrize("data, lead", [
    (b"\x00asm\x01\x00\x00\x00", "00 61 73 6d 01 00 00 00"),  # wasm
    (b"\x01\x00\x02\x00\x03\x00\xff\x00", "01 00 02 00 03 00 ff 00"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "d0 cf 11 e0 a1 b1 1a e1"),  # OLE2
    (b"\x7fELF\x02\x01\x01\x00", "7f 45 4c 46 02 01 01 00"),
])
def test_a_binary_signature_is_shown_in_hex(data, lead):
  with pytest.raises(MemberError) as err:
    imaging.decode_and_resize(data, 8)
  assert str(err.value).endswith(f"(starts with bytes {lead})")


@pytest.mark.parametrize("data, name", [
    (b"PK\x03\x04" + bytes(30), "zip"), (b"\x1f\x8b\x08" + bytes(30), "gzip"),
    (b"BZh91AY&SY" + bytes(30), "bzip2"),
    (b"\xfd7zXZ\x00\x00\x04" + bytes(30), "xz"),
    (b"7z\xbc\xaf\x27\x1c\x00\x04" + bytes(30), "7z")])
def test_an_archive_or_compressed_file_says_so_wherever_it_is(data, name):
  # Inside an archive, or given itself as --input (x.dcm.gz, scans.tar.xz):
  # the message fits both.
  with pytest.raises(MemberError) as err:
    imaging.decode_and_resize(data, 8)
  assert err.value.kind == "NestedArchive"
  assert str(err.value).startswith(
      f"a {name} file, not an image: zip, tar and tar.gz (.tgz) files given"
      " as --input are opened, not archives inside them nor other compressed"
      " files; extract it")


def test_a_broken_header_reads_the_same_on_every_run():
  # Pillow names the file object it was given, address and all
  # ("cannot identify image file <_io.BytesIO object at 0x7f...>"); an
  # error row must not differ between two runs over the same bytes.
  data = b"\x89PNG\r\n\x1a\nxx"
  messages = set()
  for _ in range(2):
    with pytest.raises(MemberError) as err:
      imaging.decode_and_resize(data, 8)
    messages.add(str(err.value))
  (message,) = messages
  assert message == ("unreadable png header: UnidentifiedImageError:"
                     " cannot identify image file")
  assert pickle.loads(pickle.dumps(err.value)).args == err.value.args
  # Only the repr goes: the words around it stay.
  assert str(MemberError("CorruptImage", "read <a.B object at 0xfe1>: tail")
             ) == "read: tail"


def test_pixel_limit_checked_before_decoding():
  rng = np.random.default_rng(2)
  data = af.png(af.speckle(rng, 100, 100))
  with pytest.raises(MemberError) as err:
    imaging.decode_and_resize(data, 8, max_pixels=9_999)
  assert err.value.kind == "TooManyPixels"
  assert "--max_pixels" in str(err.value)


def test_jpeg_named_png_is_decoded_by_its_bytes():
  rng = np.random.default_rng(3)
  data = af.jpeg(af.speckle(rng, 20, 20, 3))
  assert imaging.sniff_format(data) == "jpeg"
  assert imaging.decode_and_resize(data, 8).pixels.shape == (8, 8, 3)


def test_example_round_trip():
  rng = np.random.default_rng(4)
  record = records.ImageRecord(
      image_id="ab" * 32, source="gs://b/x.zip!/benign/é (1).png",
      label="benign", pixels=af.speckle(rng, 6, 6, 3), original_height=300,
      original_width=400)
  back = records.from_example(records.to_example(record))
  assert back.image_id == record.image_id and back.source == record.source
  assert back.label == "benign"
  assert (back.original_height, back.original_width) == (300, 400)
  np.testing.assert_array_equal(back.pixels, record.pixels)


def test_example_matches_tf_feature_spec():
  import tensorflow as tf
  rng = np.random.default_rng(5)
  record = records.ImageRecord("c" * 64, "s", "", af.speckle(rng, 4, 4, 3),
                               9, 9)
  parsed = tf.io.parse_single_example(records.to_example(record),
                                      schemas.feature_spec())
  assert parsed[schemas.FEATURE_LABEL].numpy() == b""
  pixels = tf.reshape(tf.io.decode_raw(parsed[schemas.FEATURE_IMAGE],
                                       tf.uint8), [4, 4, 3])
  np.testing.assert_array_equal(pixels.numpy(), record.pixels)


@pytest.mark.parametrize("index", range(7))
def test_keep_grey_is_the_same_image_in_fewer_bytes(index):
  images = [e for e in af.mixed_entries() if e.fate == "image"]
  entry = images[index % len(images)]
  rgb = imaging.decode_and_resize(entry.data, 24).pixels
  compact = imaging.decode_and_resize(entry.data, 24, keep_grey=True).pixels
  grey = bool((rgb == rgb[..., :1]).all())
  assert compact.shape == ((24, 24) if grey else (24, 24, 3))
  record = records.ImageRecord("f" * 64, "s", "", compact, 24, 24)
  np.testing.assert_array_equal(
      records.from_example(records.to_example(record)).pixels, rgb)


def test_grey_saved_as_rgb_is_stored_as_one_channel():
  rng = np.random.default_rng(9)
  grey = af.speckle(rng, 40, 40)
  as_rgb = af.png(np.repeat(grey[..., None], 3, axis=2))
  pixels = imaging.decode_and_resize(as_rgb, 16, keep_grey=True).pixels
  assert pixels.shape == (16, 16)
  tinted = np.repeat(grey[..., None], 3, axis=2)
  tinted[..., 2] //= 2
  pixels = imaging.decode_and_resize(af.png(tinted), 16, keep_grey=True).pixels
  assert pixels.shape == (16, 16, 3)


def test_grey_example_is_a_third_of_the_pixels_and_parses_with_tf():
  import tensorflow as tf
  rng = np.random.default_rng(10)
  grey = af.speckle(rng, 8, 8)
  grey_ex = records.to_example(records.ImageRecord("a" * 64, "s", "", grey,
                                                   8, 8))
  rgb_ex = records.to_example(records.ImageRecord(
      "a" * 64, "s", "", np.repeat(grey[..., None], 3, axis=2), 8, 8))
  # Two channels fewer, give or take the nested length prefixes.
  assert 2 * 64 <= len(rgb_ex) - len(grey_ex) <= 2 * 64 + 8
  parsed = tf.io.parse_single_example(grey_ex, schemas.feature_spec())
  assert parsed[schemas.FEATURE_CHANNELS].numpy() == 1
  np.testing.assert_array_equal(
      tf.io.decode_raw(parsed[schemas.FEATURE_IMAGE], tf.uint8).numpy(),
      grey.ravel())


def test_format_1_records_without_channels_read_as_rgb():
  import tensorflow as tf
  rng = np.random.default_rng(11)
  pixels = af.speckle(rng, 5, 7, 3)
  example = tf.train.Example.FromString(records.to_example(
      records.ImageRecord("b" * 64, "s", "benign", pixels, 50, 70)))
  del example.features.feature[schemas.FEATURE_CHANNELS]
  serialized = example.SerializeToString()
  np.testing.assert_array_equal(records.from_example(serialized).pixels,
                                pixels)
  parsed = tf.io.parse_single_example(serialized, schemas.feature_spec())
  assert parsed[schemas.FEATURE_CHANNELS].numpy() == 3


@pytest.mark.parametrize("channels", [0, 2, 4])
def test_from_example_rejects_other_channel_counts(channels):
  import tensorflow as tf
  rng = np.random.default_rng(12)
  example = tf.train.Example.FromString(records.to_example(
      records.ImageRecord("c" * 64, "s", "", af.speckle(rng, 4, 4), 4, 4)))
  example.features.feature[schemas.FEATURE_CHANNELS].int64_list.value[0] = (
      channels)
  with pytest.raises(ValueError, match="channels"):
    records.from_example(example.SerializeToString())


def test_from_example_rejects_wrong_pixel_count():
  rng = np.random.default_rng(6)
  record = records.ImageRecord("d" * 64, "s", "", af.speckle(rng, 4, 4, 3),
                               4, 4)
  bad = records.to_example(record._replace(pixels=record.pixels[:3]))
  # Height is taken from the array, so shrink via a hand-made inconsistency.
  import tensorflow as tf
  example = tf.train.Example.FromString(bad)
  example.features.feature[schemas.FEATURE_HEIGHT].int64_list.value[0] = 4
  with pytest.raises(ValueError):
    records.from_example(example.SerializeToString())


def test_hand_written_example_equals_tensorflows():
  import tensorflow as tf
  rng = np.random.default_rng(8)
  record = records.ImageRecord(
      image_id="e" * 64, source="gs://b/ü.zip!/x (1).png", label="normal",
      pixels=af.speckle(rng, 300, 200, 3), original_height=2 ** 40,
      original_width=1)

  def feature(value):
    if isinstance(value, bytes):
      return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))

  expected = tf.train.Example(features=tf.train.Features(feature={
      schemas.FEATURE_IMAGE: feature(record.pixels.tobytes()),
      schemas.FEATURE_CHANNELS: feature(3),
      schemas.FEATURE_IMAGE_ID: feature(record.image_id.encode()),
      schemas.FEATURE_SOURCE: feature(record.source.encode()),
      schemas.FEATURE_LABEL: feature(b"normal"),
      schemas.FEATURE_HEIGHT: feature(300),
      schemas.FEATURE_WIDTH: feature(200),
      schemas.FEATURE_ORIGINAL_HEIGHT: feature(2 ** 40),
      schemas.FEATURE_ORIGINAL_WIDTH: feature(1),
  }))
  assert tf.train.Example.FromString(records.to_example(record)) == expected
