"""`python -m training {train,cv,evaluate,recalibrate,gradcam,phantoms} FLAGS`."""

import logging
import sys

from training import cli

if __name__ == "__main__":
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  sys.exit(cli.main(sys.argv[1:]))
