"""`python -m trainer.cli` runs the `spie` command (what local replicas and `spie cluster up` use)."""

import sys

from trainer.cli import main

sys.exit(main())
