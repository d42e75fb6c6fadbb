"""`python -m driftlock_cli`: the same as the `driftlock-gateway` command."""

import sys

from driftlock_cli.main import main

sys.exit(main())
