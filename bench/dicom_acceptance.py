"""Checks a scored run of a `bench.dicom_archive` zip, as the DICOM issue's
acceptance asks: every member's fate, agreement with the PNG originals'
predictions, and a byte-level scan of every output file (and given logs)
for the archive's made-up patient data.

  python -m bench.dicom_acceptance --run RUN_DIR --sidecar DICOM.zip.json \
      --png_predictions 'PNG_RUN/predictions/*.parquet' [--log run.log] \
      [--scan REPORT_DIR] [--seed 16]

With $BUSI_STUDY_HMAC_KEY set (the key the run used) it also checks that
every study_key is the HMAC of its file's StudyInstanceUID.
"""

import argparse
import collections
import glob
import json
import os
import sys
from typing import Dict, List

import duckdb

import schemas
from bench import dicom_archive
from bench import dicom_writer
from busi_core import pseudonyms

_P_MALIGNANT = schemas.probability_column(schemas.MALIGNANT)


def _member(source: str) -> str:
  return source.split("!/", 1)[1].split("#frame=")[0] if "!/" in source else (
      source)


def _uids(sidecar: Dict, seed: int) -> List[str]:
  """The Study/Series Instance UIDs bench.dicom_archive wrote (same recipe)."""
  uids = set()
  for k in range(sum(1 for v in sidecar.values() if v.get("original"))):
    uids |= set(dicom_archive.study_and_series_uids(seed, k))
  return sorted(uids)


def phi_values(uids: List[str]) -> List[str]:
  values = set(dicom_writer.PHI.values()) | set(
      dicom_writer.NESTED_PHI.values()) | set(uids)
  for name in [v for v in values if "^" in v]:
    values |= {part for part in name.split("^") if len(part) > 4}
  return sorted(values)


def scan(paths: List[str], values: List[str]) -> List[tuple]:
  """(path, value) for each value found in a file's bytes or its name."""
  found = []
  for path in paths:
    with open(path, "rb") as f:
      data = f.read()
    for value in values:
      if (value.encode() in data or value.encode("utf-16-le") in data or
          value in path):
        found.append((path, value))
  return found


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--run", required=True)
  parser.add_argument("--sidecar", required=True)
  parser.add_argument("--png_predictions", required=True,
                      help="Parquet glob of a run over the PNG originals.")
  parser.add_argument("--log", action="append", default=[],
                      help="A log or printed output to scan too; repeatable.")
  parser.add_argument("--scan", action="append", default=[],
                      help="Another folder to scan (the report); repeatable.")
  parser.add_argument("--seed", type=int, default=0,
                      help="The --seed bench.dicom_archive was given.")
  args = parser.parse_args(argv)
  with open(args.sidecar, encoding="utf-8") as f:
    sidecar = json.load(f)
  con = duckdb.connect()
  preds = con.execute(
      f"SELECT {schemas.COLUMN_SOURCE}, {schemas.COLUMN_FRAME},"
      f" {schemas.COLUMN_PREDICTED_CLASS}, {_P_MALIGNANT},"
      f" {schemas.COLUMN_STUDY_KEY}, {schemas.COLUMN_REGION_CROPPED}"
      " FROM read_parquet(?)",
      [os.path.join(args.run, schemas.PREDICTIONS_DIR, "*.parquet")]
  ).fetchall()
  errors = con.execute(
      f"SELECT {schemas.COLUMN_SOURCE}, {schemas.COLUMN_ERROR_TYPE}"
      " FROM read_parquet(?)",
      [os.path.join(args.run, schemas.ERRORS_DIR, "*.parquet")]).fetchall()

  # 1. Fates.
  fates = collections.defaultdict(list)
  for source, *_ in preds:
    fates[_member(source)].append("prediction")
  for source, error_type in errors:
    fates[_member(source)].append(error_type)
  unknown = sorted(set(fates) - set(sidecar))
  missing = sorted(set(sidecar) - set(fates))
  table = collections.Counter()
  for member, entry in sidecar.items():
    group = "BUSI as DICOM" if entry.get("original") else "pydicom corpus"
    outcome = collections.Counter(fates.get(member, ["MISSING"]))
    key = ", ".join(f"{n}x {k}" if n > 1 else k
                    for k, n in sorted(outcome.items()))
    table[(group, key)] += 1
  print("1. Every member's fate (members; a cine is one member, N rows)")
  for (group, key), n in sorted(table.items()):
    print(f"   {group:15} {n:4}  {key}")
  print(f"   members in the sidecar: {len(sidecar)}; with no row: "
        f"{len(missing)}; rows for members not in the sidecar: {len(unknown)}")

  # 2. Agreement with the PNG originals.
  png = {_member(s): (c, p)
         for s, c, p in con.execute(
             f"SELECT {schemas.COLUMN_SOURCE},"
             f" {schemas.COLUMN_PREDICTED_CLASS}, {_P_MALIGNANT} FROM"
             " read_parquet(?)", [args.png_predictions]).fetchall()}
  by_kind = collections.defaultdict(lambda: [0, 0, 0.0, 0.0])
  for source, _, cls, p_mal, _, _ in preds:
    entry = sidecar.get(_member(source), {})
    original = entry.get("original")
    if not original or original not in png:
      continue
    kind = ("bit-exact pixels" if entry.get("exact") else
            "lossy (JPEG / YBR 4:2:2)")
    stats = by_kind[kind]
    stats[0] += 1
    stats[1] += cls == png[original][0]
    diff = abs(p_mal - png[original][1])
    stats[2] = max(stats[2], diff)
    stats[3] += diff
  print("2. Agreement with the PNG originals' predictions (rows)")
  for kind, (n, same, worst, total) in sorted(by_kind.items()):
    print(f"   {kind:26} {same}/{n} same class ({100 * same / n:.1f} %);"
          f" |Δ p_malignant| mean {total / n:.4f}, max {worst:.4f}")

  # 3. Study keys.
  key = pseudonyms.resolve_key(None)
  keys = {k for source, *_, k, _ in preds
          if k and sidecar.get(_member(source), {}).get("original")}
  if key:
    uids = _uids(sidecar, args.seed)
    expected = {pseudonyms.pseudonym(key, u) for u in uids}
    print(f"3. study_key of the BUSI DICOMs: {len(keys)} distinct, all"
          f" HMACs of the archive's UIDs: {keys <= expected}")
  else:
    print(f"3. study_key: {len(keys)} distinct ($BUSI_STUDY_HMAC_KEY unset:"
          " not checked)")

  # 4. PHI scan.
  paths = [p for folder in [args.run] + args.scan
           for p in glob.glob(os.path.join(folder, "**"), recursive=True)
           if os.path.isfile(p)] + args.log
  values = phi_values(_uids(sidecar, args.seed))
  found = scan(paths, values)
  size = sum(os.path.getsize(p) for p in paths)
  print(f"4. PHI scan: {len(values)} values x {len(paths)} files"
        f" ({size / 1e6:.1f} MB): {len(found)} found")
  for path, value in found[:20]:
    print(f"   FOUND {value!r} in {path}")
  return 1 if found or missing or unknown else 0


if __name__ == "__main__":
  sys.exit(main())
