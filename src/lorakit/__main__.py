"""``python -m lorakit ...`` runs the ``lorakit`` command line."""

import sys

from lorakit.cli import main

sys.exit(main())
