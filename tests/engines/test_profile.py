"""qdit4sr-profile: the trtexec command lines (exact strings) and the CLI's error paths."""
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from qdit4sr.cli.engines import profile_command
from qdit4sr.engines import profile as P
from qdit4sr.engines.build import EngineBuildConfig, InputSpec, network_inputs
from tests.engines.test_build import make_export_folder

SHAPES_B2 = ("hidden_states:2x12x8x8,controlnet_image:2x12x8x8,encoder_hidden_states:2x3x32,"
             "pooled_projections:2x16,timestep:2")
PROFILE_00 = (f"trtexec --loadEngine=segment_00.plan --shapes={SHAPES_B2} --dumpProfile "
              f"--exportProfile=segment_00.profile.json --separateProfileRun --iterations=50")
PROFILE_01 = PROFILE_00.replace("segment_00", "segment_01")


def _build_line(k: int) -> str:
    def spec(b):
        return (f"hidden_states:{b}x12x8x8,controlnet_image:{b}x12x8x8,encoder_hidden_states:{b}x3x32,"
                f"pooled_projections:{b}x16,timestep:{b}")

    return (f"trtexec --onnx=segment_{k:02d}.trt.onnx --stronglyTyped --minShapes={spec(1)} --optShapes={spec(2)} "
            f"--maxShapes={spec(32)} --memPoolSize=workspace:4096M --builderOptimizationLevel=3 "
            f"--timingCacheFile=timing.cache --saveEngine=segment_{k:02d}.plan")


@pytest.fixture
def engines_folder(tmp_path) -> Path:
    return make_export_folder(tmp_path / "engines", engines=True)


@pytest.fixture
def graphs_folder(tmp_path) -> Path:
    return make_export_folder(tmp_path / "graphs")


# --------------------------------------------------------------------------- command lines


def test_trtexec_shapes_and_profile_command(engines_folder):
    inputs = network_inputs(engines_folder)
    assert P.trtexec_shapes(inputs, 2) == SHAPES_B2
    assert P.trtexec_shapes([InputSpec("t", ("batch",))], 7) == "t:7"
    command = P.trtexec_profile_command("segment_00.plan", "segment_00.profile.json", inputs, 2, 50)
    assert " ".join(command) == PROFILE_00


def test_trtexec_build_command(graphs_folder):
    inputs = network_inputs(graphs_folder)
    command = P.trtexec_build_command("segment_01.trt.onnx", "segment_01.plan", inputs, EngineBuildConfig(),
                                      "timing.cache")
    assert " ".join(command) == _build_line(1)
    small = P.trtexec_build_command("g.onnx", "g.plan", [InputSpec("t", ("batch",))],
                                    EngineBuildConfig(batch_opt=1, batch_max=1, workspace_bytes=1 << 20,
                                                      builder_optimization_level=5))
    assert " ".join(small) == ("trtexec --onnx=g.onnx --stronglyTyped --minShapes=t:1 --optShapes=t:1 "
                               "--maxShapes=t:1 --memPoolSize=workspace:1M --builderOptimizationLevel=5 "
                               "--saveEngine=g.plan")


def test_plan_for_engines(engines_folder):
    plan = P.plan_profile(engines_folder, batch=2, iterations=50)
    assert plan.kind == "engines"
    assert [" ".join(c) for c in plan.commands] == [PROFILE_00, PROFILE_01]
    assert plan.lines()[-2:] == [PROFILE_00, PROFILE_01]
    notes = " ".join(plan.notes)
    assert "no --plugins/--dynamicPlugins flag is needed" in notes and str(engines_folder.resolve()) in notes


def test_plan_default_batch_is_the_profile_opt(engines_folder):
    plan = P.plan_profile(engines_folder)
    assert f"--shapes={SHAPES_B2}" in plan.commands[0] and plan.commands[0][-1] == "--iterations=100"


def test_plan_for_graphs_only(graphs_folder):
    plan = P.plan_profile(graphs_folder)
    assert plan.kind == "graphs"
    assert [" ".join(c) for c in plan.commands] == [_build_line(0), _build_line(1)]
    notes = " ".join(plan.notes)
    assert "no TensorRT engines" in notes
    assert "LowRankBranch" in notes and "trtexec cannot load Python plugins" in notes
    assert "qdit4sr-build-engines" in notes and "--dynamicPlugins=<lib>" in notes
    assert "lack aot=1" not in notes


def test_plan_warns_about_jit_plugin_nodes(tmp_path):
    plan = P.plan_profile(make_export_folder(tmp_path / "jit", aot=0))
    assert "lack aot=1" in " ".join(plan.notes)


@pytest.mark.parametrize("make,match", [
    (lambda tmp: tmp / "missing", "does not exist"),
    (lambda tmp: (tmp / "file").write_text("x") and tmp / "file", "is not a folder"),
    (lambda tmp: tmp, "has no manifest.json"),
    (lambda tmp: make_export_folder(tmp / "p", flavours=("portable",)), "no TensorRT engines and no 'trt' graphs"),
])
def test_plan_errors(tmp_path, make, match):
    with pytest.raises(P.ProfileError, match=match):
        P.plan_profile(make(tmp_path))


def test_plan_reports_a_broken_manifest(engines_folder):
    (engines_folder / "segment_01.plan").unlink()
    with pytest.raises(P.ProfileError, match="segment 1 engine: file segment_01.plan is missing"):
        P.plan_profile(engines_folder)
    with pytest.raises(P.ProfileError, match="batch"):
        P.plan_profile(engines_folder, batch=0)


def test_run_plan(engines_folder):
    plan = P.plan_profile(engines_folder, iterations=50)
    calls, echoed = [], []

    def runner(command, cwd):
        calls.append((command, cwd))
        return subprocess.CompletedProcess(command, 1 if "segment_01.plan" in command[1] else 0)

    failed = P.run_plan(plan, echo=echoed.append, runner=runner, which=lambda name: "/usr/bin/trtexec")
    assert failed == 1
    assert [c for c, _ in calls] == plan.commands and {cwd for _, cwd in calls} == {str(engines_folder)}
    assert echoed[0] == f"$ {PROFILE_00.replace('=100', '=50')}" and "# exit code 1" in echoed
    with pytest.raises(P.ProfileError, match="trtexec is not on PATH"):
        P.run_plan(plan, which=lambda name: None)


# --------------------------------------------------------------------------- CLI


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


def test_cli_graphs_only_prints_build_commands(graphs_folder):
    result = _invoke(graphs_folder)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: no TensorRT engines in {graphs_folder}; build commands follow"
    lines = result.stdout.splitlines()
    assert lines[-2:] == [_build_line(0), _build_line(1)]
    assert any("trtexec cannot load Python plugins" in line for line in lines)


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
