"""Reading BUSI lesion masks out of archives, for `evaluate --masks`.

The masks are read with the pipeline's own readers (`busi_core.archives`,
`masks_only`), so they pass the checks the images passed (member size,
compression ratio, CRC, overlapping members); image members are passed over
(a zip's unread, a tar's streamed past). The bytes are kept undecoded, keyed
by the image they belong to (`lesions.group_masks`); only the masks of
evaluated images are ever decoded.
"""

import logging
from typing import Iterator, List, Sequence, Set, Tuple

from busi_core import archives, imaging
from training import data as data_lib, lesions
from busi_core.errors import MemberError

_LOG = logging.getLogger(__name__)


def list_archives(patterns: Sequence[str]) -> List[str]:
  """Expands --masks globs (local or gs://) into sorted distinct archives.

  Raises:
    ValueError: a pattern matches nothing, or a file that is not a zip, tar
      or tar.gz.
  """
  uris = data_lib.expand_globs(patterns, lambda pattern: (
      f"--masks {pattern!r} matches no file. Pass the BUSI archive(s)"
      " (zip, tar or tar.gz) holding the `x_mask.png` files beside the"
      " images, e.g. Dataset_BUSI_with_GT.zip."))
  for uri in uris:
    if archives.archive_kind(uri) == archives.FILE:
      raise ValueError(
          f"--masks {uri!r} is not a zip, tar or tar.gz: masks are paired by"
          " archive member path, so pass the archive itself")
  return uris


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
    patterns: globs of zip / tar / tar.gz archives in the BUSI layout.
    limits: per-member limits, as preprocessing's defaults.

  Returns:
    The masks by image key, and what could not be read. A mask path found in
    several archives (copies of one archive) is taken from the first, in
    sorted URI order.

  Raises:
    ValueError: a pattern matches nothing or not an archive, or an archive
      cannot be read (not a zip or tar, cut short, too many members).
  """
  uris = list_archives(patterns)
  found: List[Tuple[str, bytes]] = []
  failed: List[str] = []
  for uri in uris:
    masks, bad = _read_one(uri, limits)
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
  _LOG.info("Read %d masks of %d images from %d archive(s)", len(found),
            len(grouped), len(uris))
  return lesions.MaskSets(grouped, unreadable, uris, len(found), len(failed))
