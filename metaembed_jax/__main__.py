"""`python -m metaembed_jax ...` = `metaembed ...`."""

import sys

from metaembed_jax.cli.main import main

sys.exit(main())
