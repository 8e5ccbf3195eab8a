"""trtexec command lines to profile or build the engines (exact strings) and running them."""
import subprocess

import pytest

from qdit4sr.engines import profile as P
from qdit4sr.engines.build import EngineBuildConfig, InputSpec, network_inputs
from tests.helpers.export_folder import make_export_folder

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
