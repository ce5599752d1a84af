"""Study-level results in `summary` and the HTML report: rows grouped by
study_key, from synthetic runs (several studies, null keys, a model without
a malignant class, Parquet from before the study columns)."""

import html
import re
from typing import Dict, List, NamedTuple, Optional

import pyarrow as pa
import pytest

import schemas
from busi_core import pseudonyms
from reporting import report, sql, summary
from tests.test_report import (_image_id, _make_report, _parse,
                               _rewrite_predictions, _rows, _summary_table,
                               _write_run)

HMAC_KEY = b"0123456789abcdef-test-key"
P_MALIGNANT = schemas.probability_column("malignant")
RAW_UID = "1.2.840.113619.2.55.3.604688119"
DICOM_COLUMNS = (schemas.COLUMN_FRAME, schemas.COLUMN_STUDY_KEY,
                 schemas.COLUMN_SERIES_KEY, schemas.COLUMN_REGION_CROPPED)


def _key(uid: str) -> str:
  return pseudonyms.pseudonym(HMAC_KEY, uid)


_ROW_OF = {}


def _index(row: Dict) -> int:
  """The fixture's row number of a row (sources are not all numbered)."""
  if not _ROW_OF:
    _ROW_OF.update((_image_id(i), i) for i in range(36))
  return _ROW_OF[row["image_id"]]


# Rows 0-9: study A, two series, frames 1-10 of multi-frame DICOMs; rows
# 10-14: study B, one series of single-frame DICOMs; rows 15-17: study C,
# no series UID; rows 18-35: PNGs (no DICOM fields at all).
def _three_studies(row: Dict) -> Dict:
  i = _index(row)
  if i < 10:
    study, series, frame = "A", f"A{i % 2}", i + 1
  elif i < 15:
    study, series, frame = "B", "B0", None
  elif i < 18:
    study, series, frame = "C", None, None
    # Nothing to review in study C.
    row.update({schemas.COLUMN_NEEDS_REVIEW: False,
                schemas.COLUMN_LOW_CONFIDENCE: False,
                schemas.COLUMN_OUT_OF_DISTRIBUTION: False,
                schemas.COLUMN_QUALITY_FLAGS: ""})
  else:
    return row
  row[schemas.COLUMN_STUDY_KEY] = _key(f"1.2.3.{study}")
  row[schemas.COLUMN_SERIES_KEY] = series and _key(f"1.2.3.{series}")
  row[schemas.COLUMN_FRAME] = frame
  row[schemas.COLUMN_REGION_CROPPED] = i % 2 == 0
  return row


class Study(NamedTuple):
  """One study as the rows say, computed in Python (not the reports' SQL)."""
  key: str
  images: int
  frames: int
  series: int
  review_images: int
  max_p: Optional[float]
  class_at_max: Optional[str]


def _expected_studies(rows: List[Dict], p: Optional[str] = P_MALIGNANT
                      ) -> List[Study]:
  by_key: Dict[str, List[Dict]] = {}
  for r in rows:
    if r[schemas.COLUMN_STUDY_KEY] is not None:
      by_key.setdefault(r[schemas.COLUMN_STUDY_KEY], []).append(r)
  studies = []
  for key, members in by_key.items():
    series = {m[schemas.COLUMN_SERIES_KEY] for m in members} - {None}
    review = sum(m[schemas.COLUMN_NEEDS_REVIEW] for m in members)
    top = (max(members, key=lambda m: (m[p], [-ord(c) for c in m["image_id"]]))
           if p else None)
    frames = sum(m[schemas.COLUMN_FRAME] is not None for m in members)
    studies.append(Study(key, len(members), frames, len(series), review,
                         top and top[p], top and top["predicted_class"]))
  if p:
    return sorted(studies, key=lambda s: (-s.max_p, -s.review_images,
                                          -s.images, s.key))
  return sorted(studies, key=lambda s: (-s.review_images, -s.images, s.key))


def _page(run_dir: str) -> str:
  """The report page of a local run, without drawing its plots."""
  data = report.query_report_data(run_dir)
  return report.render_html(data, dict.fromkeys(
      ("classes", "confidence", "confusion"), b"not drawn"))


def _studies_html(page: str) -> str:
  match = re.search(r'<section id="studies">.*?</section>', page, re.S)
  assert match, "no studies section"
  return match.group(0)


def _study_parts(text: str) -> List[str]:
  return [p for p in text.split("\n\n") if "Studies" in p.splitlines()[0]]


def _short(key: str) -> str:
  return key[:sql.SHORT_KEY_CHARS]


@pytest.fixture(scope="module")
def three_studies(tmp_path_factory):
  """(run_dir, rows, summary text, report html) of the three-study run."""
  base = tmp_path_factory.mktemp("studies")
  run_dir = _write_run(base / "run", tfrecords=False)
  _rewrite_predictions(run_dir, _three_studies,
                       schemas.predictions_schema(schemas.LABELS))
  return run_dir, _rows(run_dir), summary.summary(run_dir), _page(run_dir)


def test_the_fixture_has_what_the_tests_need(three_studies):
  _, rows, _, _ = three_studies
  expected = _expected_studies(rows)
  # Ranked by max p_malignant, which is not the order of size or key.
  assert [(s.key, s.images, s.frames, s.series, s.review_images,
           s.class_at_max) for s in expected] == [
              (_key("1.2.3.B"), 5, 0, 1, 4, "malignant"),
              (_key("1.2.3.A"), 10, 10, 2, 10, "malignant"),
              (_key("1.2.3.C"), 3, 0, 0, 0, "normal")]
  assert [round(s.max_p, 3) for s in expected] == [0.827, 0.679, 0.159]


def test_summary_lists_studies_by_max_p_malignant(three_studies):
  _, rows, text, _ = three_studies
  expected = _expected_studies(rows)
  [part] = _study_parts(text)
  assert part.splitlines()[0] == (
      "-- Studies (top 3 of 3, highest p_malignant first; study = first 12"
      " hex digits of study_key)")
  table = _summary_table(text, "Studies")
  assert table == [
      [_short(s.key), str(s.images), str(s.frames), str(s.series),
       f"yes ({s.review_images})" if s.review_images else "no",
       f"{s.max_p:.3f}".rstrip("0").rstrip("."), s.class_at_max]
      for s in expected]
  assert ("3 studies, 2 with an image needing review (18 of 36"
          " images carry a study_key).") in part.splitlines()
  assert ("18 images without a study_key (not DICOM, no Study Instance"
          " UID, or scored without a key) are in no study.") in part
  assert "more" not in part
  # The tables show 12 hex digits of a key, never the whole key.
  assert not any(s.key in text for s in expected)


def test_report_studies_section(three_studies):
  _, rows, _, page = three_studies
  expected = _expected_studies(rows)
  parsed = _parse(page)
  assert parsed.sections == ["run", "classes", "confidence", "review",
                             "studies", "errors", "labels"]
  assert '<a href="#studies">Studies</a>' in page
  table = parsed.tables["studies"]
  assert table[0] == ["study", "images", "frames", "series", "needs review",
                      "max p_malignant", "predicted class at max"]
  assert table[1:] == [
      [_short(s.key) + "\u2026", str(s.images), str(s.frames), str(s.series),
       f"yes ({s.review_images})" if s.review_images else "no",
       f"{s.max_p:.3f}", s.class_at_max] for s in expected]
  section = _studies_html(page)
  # The whole key only in each row's title attribute.
  titles = re.findall(r'<td class="key" title="([0-9a-f]+)">', section)
  assert titles == [s.key for s in expected]
  assert all(section.count(s.key) == 1 for s in expected)
  assert ('<p class="big" id="studies-headline">3 studies, 2 with'
          " an image needing review (18 of 36 images carry a"
          " study_key).</p>") in section
  assert "3 of 3 studies, highest p_malignant first" in section
  assert "more." not in section


def test_many_studies_are_cut_with_a_count(tmp_path, monkeypatch):
  run_dir = _write_run(tmp_path / "run", tfrecords=False)

  def study_per_row(row):  # 36 rows, 30 studies: rows 0-5 share with 30-35
    i = _index(row)
    row[schemas.COLUMN_STUDY_KEY] = _key(f"9.9.{i % 30}")
    row[schemas.COLUMN_REGION_CROPPED] = False
    return row

  _rewrite_predictions(run_dir, study_per_row,
                       schemas.predictions_schema(schemas.LABELS))
  expected = _expected_studies(_rows(run_dir))
  assert len(expected) == 30
  text = summary.summary(run_dir)
  [part] = _study_parts(text)
  assert part.splitlines()[0].startswith("-- Studies (top 20 of 30,")
  table = _summary_table(text, "Studies")
  assert [r[0] for r in table] == [_short(s.key) for s in expected[:20]]
  assert [int(r[1]) for r in table] == [s.images for s in expected[:20]]
  assert "... and 10 more." in part.splitlines()
  assert "in no study" not in part  # every row has a key

  monkeypatch.setattr(report, "STUDIES_SHOWN", 12)
  section = _studies_html(_page(run_dir))
  rows = _parse(section).tables["studies"][1:]
  assert [r[0] for r in rows] == [_short(s.key) + "\u2026"
                                  for s in expected[:12]]
  assert "12 of 30 studies" in section
  assert "<p>&hellip; and 18 more.</p>" in section


def test_dicom_without_a_key_is_one_line(tmp_path, capsys):
  run_dir = _write_run(tmp_path / "run", tfrecords=False)

  def no_key(row):
    row = _three_studies(row)
    row[schemas.COLUMN_STUDY_KEY] = row[schemas.COLUMN_SERIES_KEY] = None
    return row

  _rewrite_predictions(run_dir, no_key,
                       schemas.predictions_schema(schemas.LABELS))
  note = ("Studies: not grouped: study_key is null in every row, though 18"
          " of 36 images are DICOM (score with --study_hmac_key or"
          " $BUSI_STUDY_HMAC_KEY to group them by study).")
  text = summary.summary(run_dir)
  assert _study_parts(text) == [f"-- {note}"]
  page = _make_report(run_dir, tmp_path / "report", capsys)
  section = _studies_html(page)
  assert section == ('<section id="studies"><h2>Studies</h2>'
                     f'<p class="note">{html.escape(note)}</p></section>')
  assert "studies" not in _parse(page).tables


def test_png_runs_and_old_runs_have_no_studies(tmp_path, capsys):
  # A PNG run: every DICOM column null.
  run_dir = _write_run(tmp_path / "png", tfrecords=False)
  assert all(r[c] is None for r in _rows(run_dir) for c in DICOM_COLUMNS)
  text = summary.summary(run_dir)
  assert not _study_parts(text) and "study" not in text
  page = _make_report(run_dir, tmp_path / "png-report", capsys)
  assert 'id="studies"' not in page and "study_key" not in page

  # Parquet written before the DICOM columns, and before the review ones.
  for name, dropped in (
      ("old", DICOM_COLUMNS),
      ("older", DICOM_COLUMNS + sql.REVIEW_COLUMNS)):
    old_dir = _write_run(tmp_path / name, tfrecords=False)
    old = pa.schema([f for f in schemas.predictions_schema(schemas.LABELS)
                     if f.name not in dropped])
    _rewrite_predictions(old_dir, lambda r, d=dropped: {
        k: v for k, v in r.items() if k not in d}, old)
    assert not set(dropped) & set(_rows(old_dir)[0])
    text = summary.summary(old_dir)
    assert "Predictions per class" in text and "study" not in text
    page = _make_report(old_dir, tmp_path / f"{name}-report", capsys)
    assert 'id="studies"' not in page and "per-class" in _parse(page).tables


def test_a_value_that_is_not_a_key_is_never_shown(tmp_path):
  run_dir = _write_run(tmp_path / "run", tfrecords=False)

  def raw_uid(row):
    row = _three_studies(row)
    if row[schemas.COLUMN_STUDY_KEY] == _key("1.2.3.C"):
      row[schemas.COLUMN_STUDY_KEY] = RAW_UID  # a writer's bug, say
    return row

  _rewrite_predictions(run_dir, raw_uid,
                       schemas.predictions_schema(schemas.LABELS))
  text = summary.summary(run_dir)
  page = _page(run_dir)
  for shown in (text, page):
    assert RAW_UID[:8] not in shown
  assert sql.INVALID_KEY in [r[0] for r in _summary_table(text, "Studies")]
  assert html.escape(sql.INVALID_KEY) in [
      r[0] for r in _parse(page).tables["studies"][1:]]
  assert sql.short_key(RAW_UID) == sql.INVALID_KEY
  assert sql.short_key("A" * 64) == sql.INVALID_KEY  # hexdigest is lower
  assert sql.short_key("ab" * 32) == "ab" * 6


def test_a_model_without_malignant_ranks_by_review(tmp_path, capsys):
  labels = ("normal", "benign")
  run_dir = _write_run(tmp_path / "run", tfrecords=False)

  def two_classes(row):
    row = _three_studies(row)
    del row[P_MALIGNANT]
    if row["predicted_class"] == "malignant":
      row["predicted_class"] = "benign"
    return row

  _rewrite_predictions(run_dir, two_classes,
                       schemas.predictions_schema(labels))
  expected = _expected_studies(_rows(run_dir), p=None)
  text = summary.summary(run_dir)
  [part] = _study_parts(text)
  assert "by images needing review" in part.splitlines()[0]
  assert _summary_table(text, "Studies") == [
      [_short(s.key), str(s.images), str(s.frames), str(s.series),
       f"yes ({s.review_images})" if s.review_images else "no"]
      for s in expected]
  assert ("The model has no malignant class: studies are ranked by images"
          " needing review, then by images.") in part.splitlines()
  page = _make_report(run_dir, tmp_path / "report", capsys)
  table = _parse(page).tables["studies"]
  assert table[0] == ["study", "images", "frames", "series", "needs review"]
  assert [r[1] for r in table[1:]] == [str(s.images) for s in expected]
