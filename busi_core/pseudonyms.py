"""Keyed pseudonyms for DICOM study and series UIDs.

A row may be grouped by study without carrying the study's UID (which can be
traced back to the patient through the hospital's archive): `study_key` is
HMAC-SHA256 of the UID under a key the user keeps. The same key gives the same
pseudonym across runs, so results can be joined; without the key the UID
cannot be recovered or tested by guessing, as it could from a plain hash.
"""

import hashlib
import hmac
import os
from typing import Optional

# Where the key is read from when --study_hmac_key is not given.
KEY_ENV = "BUSI_STUDY_HMAC_KEY"
# Shorter keys are refused: HMAC-SHA256 wants at least 32 bytes of entropy
# to be worth having; 16 characters is the least we accept from a person.
MIN_KEY_CHARS = 16


def resolve_key(flag_value: Optional[str]) -> Optional[bytes]:
  """The HMAC key from the flag, else from $BUSI_STUDY_HMAC_KEY, else None.

  Raises:
    ValueError: the key is shorter than MIN_KEY_CHARS characters (the
      message never contains the key).
  """
  value = flag_value if flag_value else os.environ.get(KEY_ENV, "")
  if not value:
    return None
  if len(value) < MIN_KEY_CHARS:
    raise ValueError(
        f"the study HMAC key (--study_hmac_key or ${KEY_ENV}) has"
        f" {len(value)} characters; use at least {MIN_KEY_CHARS}, e.g. from"
        " `python -c 'import secrets; print(secrets.token_hex(32))'`")
  return value.encode("utf-8")


def pseudonym(key: Optional[bytes], uid: Optional[str]) -> Optional[str]:
  """HMAC-SHA256 hex of a UID under key; None without a key or a UID.

  UIDs are compared as DICOM writes them, less the padding (trailing NUL or
  space) that some writers add, so padded and unpadded copies of one study
  share a pseudonym.
  """
  if key is None or uid is None:
    return None
  text = uid.strip().rstrip("\0").strip()
  if not text:
    return None
  return hmac.new(key, text.encode("ascii", "replace"),
                  hashlib.sha256).hexdigest()
