"""`python -m carl_assets.cli ...`: the `carl` console script without the installed entry point."""

import sys

from carl_assets.cli.app import main

sys.exit(main())
