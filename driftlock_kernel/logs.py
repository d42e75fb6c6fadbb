"""Log format for the services: one line per event, to stderr, level from DRIFTLOCK_LOG_LEVEL."""

import logging
import os
import sys


def configure_logging() -> None:
    level = os.environ.get("DRIFTLOCK_LOG_LEVEL", "INFO").upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if level in logging.getLevelNamesMapping() else "INFO")
