"""trtexec command lines to profile (or, without engines, to build) the segment engines of an exported folder.

    plan = plan_profile(folder, batch=2, iterations=100)
    for line in plan.lines(): print(line)

Per segment engine ``segment_<kk>.plan`` the profile command is

    trtexec --loadEngine=segment_<kk>.plan --shapes=hidden_states:BxCxHxW,controlnet_image:BxCxHxW,
            encoder_hidden_states:BxSxD,pooled_projections:BxP,timestep:B --dumpProfile
            --exportProfile=segment_<kk>.profile.json --separateProfileRun --iterations=N

with the input shapes read from the manifest, run from inside the folder. No plugin flag is needed:
the engines are built with AOT plugins, whose PTX is serialized into the engine. (Engines built with
JIT Python plugins cannot run in trtexec at all: ``--dynamicPlugins`` loads C++ shared libraries,
and Python plugins have none. They must be rebuilt with AOT plugin nodes, ``aot=1``.)

A folder with graphs but no engines gets the build commands instead: ``qdit4sr-build-engines <folder>``
(absolute, so it runs from anywhere) and the ``trtexec --onnx=... --stronglyTyped ...`` lines (run
from inside the folder), with the caveat that graphs holding qdit4sr plugin nodes need the Python
builder (or a C++ IPluginV3 library passed with ``--dynamicPlugins``).
"""
from __future__ import annotations

import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..artifacts.flavour import ENGINE_FLAVOUR
from ..artifacts.manifest import MANIFEST_FILE, Manifest, ManifestError, engine_file_name
from ..checks import check_int
from .build import DEFAULT_TIMING_CACHE, EngineBuildConfig, InputSpec, network_inputs, optimization_profile_shapes

__all__ = ["TRTEXEC", "ProfileError", "ProfilePlan", "trtexec_shapes", "profile_file_name",
           "trtexec_profile_command", "trtexec_build_command", "build_engines_command", "plan_profile", "run_plan"]

TRTEXEC = "trtexec"
BUILD_ENGINES = "qdit4sr-build-engines"   # the console script of qdit4sr.cli.engines.build_engines_command
DEFAULT_ITERATIONS = 100


class ProfileError(Exception):
    """Nothing can be profiled: the message is the one-line reason."""


def profile_file_name(segment: int) -> str:
    return f"segment_{segment:02d}.profile.json"


def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def trtexec_shapes(inputs: Sequence[InputSpec], batch: int) -> str:
    """trtexec's shape list ``name:AxBxC,...`` for every input at ``batch``."""
    return ",".join(f"{s.name}:{_dims(s.concrete(batch))}" for s in inputs)


def trtexec_profile_command(engine: str, profile_json: str, inputs: Sequence[InputSpec], batch: int,
                            iterations: int) -> list[str]:
    return [TRTEXEC, f"--loadEngine={engine}", f"--shapes={trtexec_shapes(inputs, batch)}", "--dumpProfile",
            f"--exportProfile={profile_json}", "--separateProfileRun", f"--iterations={iterations}"]


def trtexec_build_command(graph: str, engine: str, inputs: Sequence[InputSpec], config: EngineBuildConfig,
                          timing_cache: str | None = None) -> list[str]:
    """The trtexec equivalent of ``build_engines`` for one segment (strongly typed, one batch profile)."""
    shapes = optimization_profile_shapes(list(inputs), config)

    def spec(which: str) -> str:
        return ",".join(f"{name}:{_dims(getattr(s, which))}" for name, s in shapes.items())

    workspace_mib = max(1, config.workspace_bytes >> 20)
    command = [TRTEXEC, f"--onnx={graph}", "--stronglyTyped", f"--minShapes={spec('min')}",
               f"--optShapes={spec('opt')}", f"--maxShapes={spec('max')}", f"--memPoolSize=workspace:{workspace_mib}M",
               f"--builderOptimizationLevel={config.builder_optimization_level}"]
    if timing_cache:
        command.append(f"--timingCacheFile={timing_cache}")
    return command + [f"--saveEngine={engine}"]


def build_engines_command(folder: Path) -> list[str]:
    """The console command that builds the engines of ``folder`` (absolute, so it runs from any folder)."""
    return [BUILD_ENGINES, str(Path(folder).resolve())]


def _plugin_nodes(graph: Path) -> tuple[set[str], bool]:
    """(plugin op types in the graph, whether every plugin node asks for the AOT implementation)."""
    import onnx  # here, like the contract: `qdit4sr-profile --help` should not load onnx

    from ..plugins import contract

    model = onnx.load(str(graph), load_external_data=False)
    ops, all_aot = set(), True
    for node in model.graph.node:
        if node.domain == contract.DOMAIN:
            ops.add(node.op_type)
            aot = next((onnx.helper.get_attribute_value(a) for a in node.attribute
                        if a.name == contract.TRT_FLAVOUR_AOT_ATTRIBUTE), 0)
            all_aot = all_aot and aot == 1
    return ops, all_aot


@dataclass
class ProfilePlan:
    """What `qdit4sr-profile` prints (and with --run executes, from inside ``folder``)."""

    folder: Path
    kind: str                                   # "engines" (profile lines) or "graphs" (build lines)
    commands: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [f"# {n}" for n in self.notes] + [shlex.join(c) for c in self.commands]


def _load_manifest(folder: Path) -> Manifest:
    if not folder.exists():
        raise ProfileError(f"{folder} does not exist")
    if not folder.is_dir():
        raise ProfileError(f"{folder} is not a folder")
    if not (folder / MANIFEST_FILE).is_file():
        raise ProfileError(f"{folder} has no {MANIFEST_FILE}; is it an exported folder (qdit4sr-export --out)?")
    try:
        return Manifest.load(folder, check_hashes=False)
    except ManifestError as e:
        raise ProfileError(f"{folder / MANIFEST_FILE}: {e}") from e


def plan_profile(folder: str | Path, batch: int | None = None, iterations: int = DEFAULT_ITERATIONS,
                 config: EngineBuildConfig | None = None) -> ProfilePlan:
    """Profile lines for the engines of ``folder``; build lines (kind "graphs") when it has none.

    Raises ProfileError for a missing folder or manifest, a broken manifest, or a folder with neither
    engines nor trt-flavour graphs.
    """
    folder = Path(folder)
    config = config or EngineBuildConfig()
    batch = config.batch_opt if batch is None else batch
    check_int("batch", batch, error=ProfileError)
    check_int("iterations", iterations, error=ProfileError)
    manifest = _load_manifest(folder)
    try:
        inputs = network_inputs(manifest)
    except ValueError as e:
        raise ProfileError(f"{folder / MANIFEST_FILE}: {e}") from e
    engines = [(seg.index, seg.engine.path) for seg in manifest.segments if seg.engine is not None]
    where = f"run from {folder.resolve()}"
    if engines:
        plan = ProfilePlan(folder, "engines", notes=[
            f"{len(engines)} TensorRT engine(s), batch {batch}; {where}",
            "AOT plugin kernels are serialized in the engines: no --plugins/--dynamicPlugins flag is needed"])
        missing = [seg.index for seg in manifest.segments if seg.engine is None]
        if missing:
            plan.notes.append(f"segments {missing} have no engine and are skipped")
        for index, engine in engines:
            plan.commands.append(trtexec_profile_command(engine, profile_file_name(index), inputs, batch, iterations))
        return plan
    graphs = [(seg.index, seg.graphs[ENGINE_FLAVOUR].path) for seg in manifest.segments if ENGINE_FLAVOUR in seg.graphs]
    if not graphs:
        raise ProfileError(f"{folder} has no TensorRT engines and no {ENGINE_FLAVOUR.value!r} graphs to build them "
                           f"from (flavours: {manifest.flavours}); re-export with --flavour {ENGINE_FLAVOUR}")
    # The builder command names the folder absolutely, so it works from anywhere; the trtexec lines use
    # the manifest's relative file names and must run inside the folder, as the last note says.
    plan = ProfilePlan(folder, "graphs", notes=[
        f"no TensorRT engines in {folder} yet (the manifest lists none): nothing to profile. Build them first "
        f"(TensorRT, triton and a CUDA GPU needed), then run qdit4sr-profile again:",
        f"  {shlex.join(build_engines_command(folder))}"])
    ops, all_aot = _plugin_nodes(folder / graphs[0][1])
    if ops:
        from ..plugins import contract

        plan.notes += [
            f"the graphs contain {contract.DOMAIN} plugin nodes ({', '.join(sorted(ops))}): trtexec cannot load "
            f"Python plugins (--dynamicPlugins takes a C++ shared library), so the command above, TensorRT's "
            f"Python builder, is the one that compiles them into the engines",
            "the trtexec lines below need an IPluginV3 library implementing docs/plugin_contract.md, "
            "passed as --dynamicPlugins=<lib>"]
        if not all_aot:
            plan.notes.append("some plugin nodes lack aot=1: their engines would embed JIT Python plugins and could "
                              "not run in trtexec or C++")
    plan.notes.append(f"or with trtexec, {where}:")
    cache = config.timing_cache_path or DEFAULT_TIMING_CACHE
    for index, graph in graphs:
        plan.commands.append(trtexec_build_command(graph, engine_file_name(index), inputs, config, cache))
    return plan


def run_plan(plan: ProfilePlan, echo: Callable[[str], None] = print,
             runner: Callable[..., subprocess.CompletedProcess] | None = None,
             which: Callable[[str], str | None] | None = None) -> int:
    """Run the plan's trtexec commands from inside its folder; the number of failed commands.

    Raises ProfileError when trtexec is not on PATH. ``runner`` / ``which`` default to
    subprocess.run / shutil.which.
    """
    runner = runner or subprocess.run
    which = which or shutil.which
    if which(TRTEXEC) is None:
        raise ProfileError(f"{TRTEXEC} is not on PATH; it ships with TensorRT (bin/ of the TensorRT tar or the "
                           f"NGC container). Run the printed commands on a machine that has it")
    failed = 0
    for command in plan.commands:
        echo(f"$ {shlex.join(command)}")
        result = runner(command, cwd=str(plan.folder))
        if result.returncode:
            echo(f"# exit code {result.returncode}")
            failed += 1
    return failed
