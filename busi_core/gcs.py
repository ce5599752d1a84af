"""Cloud Storage set-up for local runs against a storage emulator.

Beam's GCS IO talks to any server that speaks the GCS JSON API: the
google-cloud-storage client it uses honours `STORAGE_EMULATOR_HOST` and goes
anonymous there. What does not fit an emulator is Beam's credential lookup:
before creating the client it asks google-auth for default credentials and,
when there are none, retries with back-off for about 20 s per process before
connecting anonymously. An emulator needs no credentials, so with
`STORAGE_EMULATOR_HOST` set we tell Beam up front that there are none.
Against real Cloud Storage (the variable unset) nothing here applies.
"""

import logging
import os

_LOG = logging.getLogger(__name__)


def using_emulator() -> bool:
  return bool(os.environ.get("STORAGE_EMULATOR_HOST"))


def configure_for_emulator() -> None:
  """Skips Beam's credential lookup when a storage emulator is configured."""
  if not using_emulator():
    return
  from apache_beam.internal.gcp import auth  # pylint: disable=import-outside-toplevel
  # Beam caches the lookup's result per process in these two attributes.
  with auth._Credentials._credentials_lock:  # pylint: disable=protected-access
    auth._Credentials._credentials_init = True  # pylint: disable=protected-access
    auth._Credentials._credentials = None  # pylint: disable=protected-access
  _LOG.info("Cloud Storage emulator at %s: anonymous access",
            os.environ["STORAGE_EMULATOR_HOST"])
