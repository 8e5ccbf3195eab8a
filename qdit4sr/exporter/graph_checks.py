"""Checks run on every exported graph: ONNX's full checker, the TensorRT lint, polygraphy's lint."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from .trt_lint import format_violations, lint_model


def check_onnx(path: Path) -> None:
    """onnx.checker with full_check (strict shape inference) on a saved graph; raises ValueError."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ValueError(f"{Path(path).name} fails the ONNX checker: {e}") from e


def check_trt(path: Path) -> None:
    """`lint_model` must find nothing; raises ValueError listing the violations."""
    violations = lint_model(path)
    if violations:
        raise ValueError(f"{Path(path).name} breaks {len(violations)} TensorRT rule(s):\n"
                         f"{format_violations(violations)}")


@dataclass
class PolygraphyReport:
    returncode: int
    errors: list[str] = field(default_factory=list)     # lint entries of level error or exception
    warnings: list[str] = field(default_factory=list)
    output: str = ""

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and not self.errors


def _polygraphy_command() -> list[str]:
    # The package has no __main__; its console script is the supported entry point.
    script = shutil.which("polygraphy") or str(Path(sys.executable).with_name("polygraphy"))
    if Path(script).is_file():
        return [script]
    return [sys.executable, "-c", "import sys; from polygraphy.tools._main import main; sys.exit(main())"]


def polygraphy_lint(path: Path, timeout_s: float = 300.0) -> PolygraphyReport:
    """Run `polygraphy check lint` (it also runs the graph with onnxruntime) and parse its JSON report."""
    with tempfile.TemporaryDirectory() as tmp:
        report_path = Path(tmp) / "lint.json"
        proc = subprocess.run([*_polygraphy_command(), "check", "lint", str(path), "-o", str(report_path)],
                              capture_output=True, text=True, timeout=timeout_s)
        entries = json.loads(report_path.read_text()).get("lint_entries", []) if report_path.is_file() else []
    report = PolygraphyReport(proc.returncode, output=proc.stdout + proc.stderr)
    for entry in entries:
        text = f"{entry.get('source', '?')}: {entry.get('message', '')}"
        (report.errors if entry.get("level") in ("error", "exception") else report.warnings).append(text)
    if proc.returncode != 0 and not report.errors:
        report.errors.append(f"polygraphy exited with {proc.returncode}: {report.output[-2000:]}")
    return report
