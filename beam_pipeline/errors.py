"""Error rows: every member that did not make it, with its source and reason.

Each stage sends its failures to the ERRORS output as rows of the errors
table (`schemas.error_columns()`); the composer writes and counts them, and
each row made adds to the Beam counter of its stage (`errors_<stage>`).
"""

from typing import Dict

import schemas
from beam_pipeline import progress

# Tag of the dead-letter output of every step that can fail.
ERRORS = "errors"

_ERROR_COLUMNS = tuple(schemas.error_columns())


def error_row(source: str, stage: schemas.Stage, error_type: str,
              message: str, run_id: str) -> Dict[str, str]:
  """One row of the errors table (column names from schemas), counted."""
  progress.count(schemas.errors_counter(stage))
  return dict(zip(_ERROR_COLUMNS, (source, schemas.Stage(stage).value,
                                    error_type, message, run_id), strict=True))
