"""Triton kernels on the CPU: a test file's cases run under `TRITON_INTERPRET=1` in a
subprocess (the variable must be set before triton is imported, and must not leak into the
rest of the test session), and each case's outcome comes back as JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Callable

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
Case = Callable[[], None]


def run_in_subprocess(test_file: str, tmp_dir: Path) -> dict[str, str | None]:
    """Run `python test_file RESULTS` under the interpreter; case name -> traceback or None."""
    results = tmp_dir / "results.json"
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, test_file, str(results)], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(results.read_text())


def run_cases(cases: dict[str, Case], results_path: str) -> None:
    """The subprocess side: run every case, recording its traceback if it fails."""
    assert os.environ.get("TRITON_INTERPRET") == "1" and "triton" not in sys.modules
    results: dict[str, str | None] = {}
    for name, case in cases.items():
        torch.manual_seed(0)
        try:
            case()
            results[name] = None
        except Exception:
            results[name] = traceback.format_exc()
    Path(results_path).write_text(json.dumps(results))


def interpreter_tests(test_file: str, cases: dict[str, Case]) -> tuple[Callable, Callable]:
    """The pytest side of a test file's cases: a module fixture that runs them all in one
    interpreter subprocess, and a test per case. Assign both at module level:
    `interpreter_results, test_triton_kernel = interpreter_tests(__file__, CASES)`."""
    @pytest.fixture(scope="module")
    def interpreter_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str | None]:
        pytest.importorskip("triton")
        return run_in_subprocess(test_file, tmp_path_factory.mktemp("triton_interpreter"))

    @pytest.mark.parametrize("case", list(cases))
    def test_triton_kernel(interpreter_results: dict[str, str | None], case: str) -> None:
        error = interpreter_results[case]
        assert error is None, error

    return interpreter_results, test_triton_kernel
