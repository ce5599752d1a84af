"""`python -m beam_pipeline {preprocess,score,run,summary,report} FLAGS`."""

from beam_pipeline import cli

if __name__ == "__main__":
  cli.command_line()
