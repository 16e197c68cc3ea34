"""The lab (deploy/lab/lab.py) is a script beside the deployment files, not part of the dst
package: tests import it as the top-level module `lab` from that directory (mypy finds it
through mypy_path in pyproject.toml)."""

from __future__ import annotations

import sys
from pathlib import Path

LAB_DIR = str(Path(__file__).resolve().parents[2] / "deploy" / "lab")
if LAB_DIR not in sys.path:
    sys.path.insert(0, LAB_DIR)
