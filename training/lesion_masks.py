"""Reading BUSI lesion masks out of archives or folders, for `evaluate
--masks`.

The masks are read with the pipeline's own readers (`busi_core.archives`,
`masks_only`), so they pass the checks the images passed (member size,
compression ratio, CRC, overlapping members); image members are passed over
(a zip's unread, a tar's streamed past). The bytes are kept undecoded, keyed
by the image they belong to (`lesions.group_masks`); only the masks of
evaluated images are ever decoded. Mask files (in a folder, or matched by a
glob) are read whole, up to the member size limit.
"""

import logging
import os
from typing import Iterator, List, Sequence, Set, Tuple

from apache_beam.io.filesystems import FileSystems

from busi_core import archives, imaging
from training import lesions
from busi_core.errors import MemberError

_LOG = logging.getLogger(__name__)


def _folder_masks(folder: str) -> List[str]:
  """The mask files under a local folder, at any depth (archives in it are
  not opened: a folder is read as BUSI unpacked)."""
  return sorted(os.path.join(root, name)
                for root, _, names in os.walk(folder) for name in names
                if imaging.is_mask(name))


def list_sources(patterns: Sequence[str]) -> Tuple[List[str], List[str]]:
  """Expands --masks values into sorted distinct archives and mask files
  (`x_mask.png`, ...): a glob (local or gs://) names archives or mask
  files, any other file it matches being passed over (the images beside
  the masks); a local folder, its mask files at any depth.

  Raises:
    ValueError: a value names no file, or neither an archive nor a mask.
  """
  found_archives, mask_files = set(), set()
  for pattern in patterns:
    if "://" not in pattern and os.path.isdir(pattern):
      masks = _folder_masks(pattern)
      if not masks:
        raise ValueError(f"--masks {pattern!r}: the folder holds no mask"
                         " file (`x_mask.png`, `x_mask_1.png`)")
      mask_files.update(masks)
      continue
    uris = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
    if not uris:
      raise ValueError(
          f"--masks {pattern!r} matches no file. Pass the BUSI archive(s)"
          " (zip, tar or tar.gz), the local folder BUSI was unpacked into,"
          " or a glob of its `x_mask.png` files, e.g."
          " Dataset_BUSI_with_GT.zip.")
    archived = {u for u in uris if archives.archive_kind(u) != archives.FILE}
    masks = {u for u in uris if u not in archived and imaging.is_mask(u)}
    if not archived and not masks:
      raise ValueError(
          f"--masks {pattern!r}: none of its {len(uris)} files is a zip, tar"
          " or tar.gz archive or a mask (`x_mask.png`, `x_mask_1.png`)")
    found_archives |= archived
    mask_files |= masks
  return sorted(found_archives), sorted(mask_files)


def _read_files(uris: Sequence[str], limits: archives.Limits
               ) -> Tuple[List[Tuple[str, bytes]], List[str]]:
  """(path, bytes) of the mask files that can be read, paths of the others
  (gone or refused by now, or larger than a member may be); paths as
  `source` columns spell them (`archives.display_uri`)."""
  found, unreadable = [], []
  for uri in uris:
    path = archives.display_uri(uri)
    try:
      with FileSystems.open(uri, compression_type="uncompressed") as f:
        data = f.read(limits.max_member_bytes + 1)
    # Any storage error (OSError locally; Google API errors on gs://) makes
    # this one mask unusable, as an unreadable archive member would.
    except Exception as e:  # pylint: disable=broad-except
      _LOG.warning("mask %s unreadable (%s)", path, type(e).__name__)
      unreadable.append(path)
      continue
    if len(data) > limits.max_member_bytes:
      _LOG.warning("mask %s unreadable (over %d bytes)", path,
                   limits.max_member_bytes)
      unreadable.append(path)
      continue
    found.append((path, data))
  return found, unreadable


def _members(uri: str, limits: archives.Limits) -> Iterator[archives.Member]:
  if archives.archive_kind(uri) == archives.TAR:
    yield from archives.read_tar(uri, limits, masks_only=True)
    return
  try:
    count = archives.count_zip_members(uri, limits.max_members)
  except MemberError as e:
    raise ValueError(f"--masks {uri}: {e}") from e
  cache = archives.OpenZipCache()
  try:
    for zip_range in archives.split_zip(uri, count):
      yield from archives.read_zip_range(zip_range, limits, cache,
                                         masks_only=True)
  finally:
    cache.close()


def _read_one(uri: str, limits: archives.Limits
             ) -> Tuple[List[Tuple[str, bytes]], List[str]]:
  """(member path, bytes) of the readable masks, paths of the others."""
  prefix = uri + "!/"
  found, unreadable = [], []
  for member in _members(uri, limits):
    # The path as it is spelled in `source`, so that it compares with the
    # images' sources (member_source cleans the name).
    path = member.source[len(prefix):]
    if member.kind == "mask" and member.source.startswith(prefix):
      found.append((path, member.data))
      continue
    if member.source.startswith(prefix) and imaging.is_mask(member.path):
      unreadable.append(path)
      _LOG.warning("mask %s unreadable (%s: %s)", member.source,
                   member.error.kind, member.error)
      continue
    # An error of the archive itself: masks missing from the middle of it
    # would pass for images without a mask.
    raise ValueError(f"--masks {uri}: {member.error}")
  return found, unreadable


def read_mask_archives(patterns: Sequence[str],
                       limits: archives.Limits = archives.Limits()
                      ) -> lesions.MaskSets:
  """The lesion masks of the archives matched by `patterns`.

  Args:
    patterns: globs of zip / tar / tar.gz archives in the BUSI layout, or
      of mask files, or local folders holding them (`list_sources`).
    limits: per-member limits, as preprocessing's defaults.

  Returns:
    The masks by image key (an archive's by member path, a file's by its
    path; see `lesions.pair`), and what could not be read. A mask path found
    in several archives (copies of one archive) is taken from the first, in
    sorted URI order.

  Raises:
    ValueError: a pattern matches nothing, or nothing that is an archive or
      a mask, or an archive cannot be read (not a zip or tar, cut short,
      too many members).
  """
  uris, files = list_sources(patterns)
  found: List[Tuple[str, bytes]] = []
  failed: List[str] = []
  for uri in uris:
    masks, bad = _read_one(uri, limits)
    found += masks
    failed += bad
  masks, bad = _read_files(files, limits)
  found += masks
  failed += bad
  grouped = lesions.group_masks(found)
  # A set missing one of its masks would score against part of the lesion;
  # a copy of that mask read from another archive makes it whole again.
  unreadable: Set[str] = set()
  for path in failed:
    key = imaging.mask_owner(path)
    if key is not None and path not in grouped.get(key, {}):
      unreadable.add(key)
  _LOG.info("Read %d masks of %d images from %d archive(s) and %d mask"
            " file(s)", len(found), len(grouped), len(uris), len(files))
  return lesions.MaskSets(grouped, unreadable, uris, len(found), len(failed))
