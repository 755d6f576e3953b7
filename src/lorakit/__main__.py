"""``python -m lorakit ...`` runs the ``lorakit`` command line."""

import sys

from .cli import main

sys.exit(main())
