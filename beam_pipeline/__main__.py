"""`python -m beam_pipeline {preprocess,score,run,report} FLAGS`."""

import logging
import sys

from beam_pipeline import cli

if __name__ == "__main__":
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  sys.exit(cli.main(sys.argv[1:]))
