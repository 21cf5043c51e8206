"""The reason of a skip in an async (trio) test reaches pytest's summary (tests/conftest.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def test_async_skip_reason_is_in_the_summary(tmp_path: Path) -> None:
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\ntrio_mode = true\n")
    (tmp_path / "test_x.py").write_text(
        "import pytest\n\n\nasync def test_needs_a_tool():\n    pytest.skip('install the tool: apt-get install x')\n")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert "1 skipped" in result.stdout, result.stdout + result.stderr
    assert "test_x.py:5: install the tool: apt-get install x" in result.stdout, result.stdout
