"""``python -m dst`` is the ``dst`` command."""

from __future__ import annotations

import sys

from dst.cli import main

sys.exit(main())
