"""`-h` and `--help` work on every console script that pyproject.toml installs, without loading torch."""
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

tomllib = pytest.importorskip("tomllib", reason="tomllib (Python 3.11+) reads pyproject.toml")

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def console_scripts() -> dict[str, str]:
    """[project.scripts] of pyproject.toml: command name -> "module:function"."""
    return tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]


def load_entry_point(spec: str):
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


SCRIPTS = console_scripts()


def test_the_readme_commands_are_console_scripts_and_each_is_a_click_command():
    import click

    assert {"qdit4sr-export", "qdit4sr-upscale", "qdit4sr-lint-trt", "qdit4sr-profile",
            "qdit4sr-build-engines"} <= set(SCRIPTS)
    assert all(isinstance(load_entry_point(spec), click.Command) for spec in SCRIPTS.values())


@pytest.mark.parametrize("name", sorted(SCRIPTS))
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help(name, flag):
    result = CliRunner().invoke(load_entry_point(SCRIPTS[name]), [flag])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage: ") and "-h, --help" in result.output


def test_help_loads_no_heavy_module():
    """--help answers at once: no command imports torch, diffusers, onnx or onnxruntime to print it."""
    calls = "\n".join(f"run({SCRIPTS[name].split(':')[0]!r}, {SCRIPTS[name].split(':')[1]!r})" for name in SCRIPTS)
    code = f"""
import importlib, sys
def run(module, attr):
    try:
        getattr(importlib.import_module(module), attr)(["--help"])
    except SystemExit as e:
        assert e.code == 0, (module, e.code)
{calls}
print(sorted(m for m in ("torch", "diffusers", "onnx", "onnxruntime", "matplotlib") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PYPROJECT.parent).stdout
    assert out.strip().splitlines()[-1] == "[]"
