"""qdit4sr-profile and qdit4sr-build-engines: what they print, and their one-line errors with exit code 2."""
import shlex
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from qdit4sr.cli.engines import profile_command
from qdit4sr.engines import profile as P
from tests.engines.test_profile import PROFILE_00, PROFILE_01, _build_line
from tests.helpers.export_folder import make_export_folder


def _invoke(*args):
    return CliRunner().invoke(profile_command, [str(a) for a in args])


def test_cli_prints_profile_commands(engines_folder):
    result = _invoke(engines_folder, "--iterations", 50)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[-2:] == [PROFILE_00, PROFILE_01]
    assert all(line.startswith("#") for line in lines[:-2])


def test_cli_batch_option(engines_folder):
    result = _invoke(engines_folder, "--batch", 4)
    assert result.exit_code == 0
    assert "hidden_states:4x12x8x8" in result.stdout and "timestep:4 " in result.stdout


@pytest.mark.parametrize("make,message", [
    (lambda tmp: tmp / "missing", "does not exist"),
    (lambda tmp: tmp, "has no manifest.json"),
    (lambda tmp: make_export_folder(tmp / "p", flavours=("portable",)), "no TensorRT engines and no 'trt' graphs"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path, make, message):
    result = _invoke(make(tmp_path))
    assert result.exit_code == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error: ") and message in result.stderr


def test_cli_graphs_only_prints_build_commands_and_exits_0(graphs_folder):
    """What the README's `qdit4sr-profile engines/` meets after an export without TensorRT."""
    result = _invoke(graphs_folder)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert "nothing to profile" in lines[0] and "Build them first" in lines[0]
    assert lines[-2:] == [_build_line(0), _build_line(1)]
    assert any("trtexec cannot load Python plugins" in line for line in lines)


def test_cli_graphs_only_with_run_is_an_error(graphs_folder):
    result = _invoke(graphs_folder, "--run")
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: no TensorRT engines in {graphs_folder} to run; build them with the " \
                                    f"commands above"


def test_printed_build_commands_work_from_where_they_say(graphs_folder, tmp_path, monkeypatch):
    """The qdit4sr-build-engines line runs from any folder (it reaches the TensorRT check, not a missing
    manifest), and the trtexec lines name files that exist in the folder they are to be run from."""
    from qdit4sr.engines.build import tensorrt_status
    from tests.cli.test_help import console_scripts, load_entry_point

    lines = _invoke(graphs_folder).stdout.splitlines()
    builder = [shlex.split(line.lstrip("# ")) for line in lines if line.lstrip("# ").startswith("qdit4sr-build-engines")]
    assert len(builder) == 1
    argv = builder[0]
    command = load_entry_point(console_scripts()[argv[0]])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    available, reason = tensorrt_status()
    if not available:
        result = CliRunner().invoke(command, argv[1:])
        assert result.exit_code == 2
        assert "building TensorRT engines is not possible here" in result.stderr and "manifest" not in result.stderr

    where = next(line for line in lines if line.startswith("# or with trtexec, run from "))
    run_from = Path(where.removeprefix("# or with trtexec, run from ").rstrip(":"))
    assert run_from == graphs_folder.resolve()
    for line in lines[-2:]:
        onnx = next(a for a in shlex.split(line) if a.startswith("--onnx="))
        assert (run_from / onnx.removeprefix("--onnx=")).is_file()


def test_cli_run_without_trtexec(engines_folder, monkeypatch):
    monkeypatch.setattr(P.shutil, "which", lambda name: None)
    result = _invoke(engines_folder, "--run")
    assert result.exit_code == 2
    assert PROFILE_00.replace("=50", "=100") in result.stdout  # the commands are still printed
    assert result.stderr.strip().startswith("error: trtexec is not on PATH")


def test_cli_run_executes_in_the_folder(engines_folder, monkeypatch):
    calls = []
    monkeypatch.setattr(P.shutil, "which", lambda name: "/opt/tensorrt/bin/trtexec")
    monkeypatch.setattr(P.subprocess, "run", lambda command, cwd: calls.append((command, cwd))
                        or subprocess.CompletedProcess(command, 0))
    result = _invoke(engines_folder, "--run", "--iterations", 50)
    assert result.exit_code == 0, result.output
    assert [" ".join(c) for c, _ in calls] == [PROFILE_00, PROFILE_01]
    assert all(cwd == str(engines_folder) for _, cwd in calls)
    assert f"$ {PROFILE_00}" in result.stdout


def test_cli_run_reports_failed_runs(engines_folder, monkeypatch):
    monkeypatch.setattr(P.shutil, "which", lambda name: "/opt/tensorrt/bin/trtexec")
    monkeypatch.setattr(P.subprocess, "run", lambda command, cwd: subprocess.CompletedProcess(command, 3))
    result = _invoke(engines_folder, "--run")
    assert result.exit_code == 1
    assert "error: 2 of 2 trtexec run(s) failed" in result.stderr


def test_build_cli_reports_why_engines_were_not_built(graphs_folder):
    from qdit4sr.cli.engines import build_engines_command
    from qdit4sr.engines.build import tensorrt_status

    available, reason = tensorrt_status()
    if available:  # pragma: no cover
        pytest.skip("TensorRT and a GPU are available here")
    result = CliRunner().invoke(build_engines_command, [str(graphs_folder)])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: engines were not built: building TensorRT engines is not possible here")
    assert reason in result.stderr
