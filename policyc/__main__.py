"""`python -m policyc`: the same as the `policyc` command."""

import sys

from .cli import main

sys.exit(main())
