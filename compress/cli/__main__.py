"""``python -m compress.cli`` (and ``torchrun -m compress.cli``)."""

import sys

from compress.cli.main import main

sys.exit(main())
