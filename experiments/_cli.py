"""What the experiment scripts share on the command line."""

import sys

from absl import flags
from absl import logging


def quiet_logs() -> None:
  """WARNING and above only, unless ``--verbosity`` was given: orbax and jax
  log every checkpoint save at INFO, which would bury the progress bar."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def fail(program: str, error: Exception, status: int) -> None:
  """Ends the program with one line on stderr."""
  print(f"{program}: error: {error}", file=sys.stderr)
  sys.exit(status)
