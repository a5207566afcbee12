"""The API process never imports torch or the workers (docs/design.md): it starts fast and
stays small. Checked in a fresh interpreter, as nothing else in the test session imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import sys
import frontend.cli
import frontend.api_server
heavy = sorted(name for name in sys.modules if name == "torch" or name == "workers" or name.startswith("workers."))
print(",".join(heavy))
"""


def test_the_frontend_imports_neither_torch_nor_the_workers():
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"imported by frontend.cli / frontend.api_server: {result.stdout.strip()}"
