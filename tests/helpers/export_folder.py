"""A tiny exported folder that the manifest validates (hashes included), with the exporter's real I/O spec,
one-node trt graphs and, if asked, stand-in engine files: for the engine build, profile and runtime tests."""
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx

from qdit4sr.artifacts.graph_io import io_spec
from qdit4sr.artifacts.manifest import FileRef, Manifest, SegmentEntry, TensorSpec, engine_file_name, graph_file_name
from qdit4sr.calibration.plan import BitPlan, LayerPlan, QDiT4SRConfig
from qdit4sr.models.pipeline import PipelineConfig
from qdit4sr.plugins import contract

TILE, TOKENS = 8, 3
TRANSFORMER = SimpleNamespace(patch_size=2, in_channels=12, out_channels=12, joint_attention_dim=32,
                              pooled_projection_dim=16)


def _plugin_graph(path: Path, aot: int = 1) -> None:
    """A one-node trt-flavour stand-in: x -> LowRankBranch -> velocity (enough for the profile tool)."""
    down = onnx.numpy_helper.from_array(np.zeros((2, 4), np.float32), "down")
    up = onnx.numpy_helper.from_array(np.zeros((4, 2), np.float32), "up")
    node = contract.make_plugin_node("LowRankBranch", ["x", "down", "up"], ["y"], name="lr", rank=2,
                                     in_features=4, out_features=4, aot=aot)
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", 1, ["batch", 4])],
                                   [onnx.helper.make_tensor_value_info("y", 1, ["batch", 4])], [down, up])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21),
                                                          contract.domain_opset()]), str(path))


def make_export_folder(folder: Path, segments=((0, 2), (2, 4)), flavours=("trt",), engines: bool = False,
                       aot: int = 1) -> Path:
    """An exported folder the manifest validates (hashes included), with the exporter's real I/O spec."""
    folder.mkdir(parents=True, exist_ok=True)
    steps = segments[-1][1]
    timesteps = [1000.0 - 10 * s for s in range(steps)]
    layer = LayerPlan("lr", 4, 4, 4, 1.0, [4] * len(segments), [0.1] * len(segments), rank=2)
    BitPlan(QDiT4SRConfig.preset("qdit4sr", "w4a4"), timesteps, [tuple(s) for s in segments], [layer]).save(
        folder / "bit_plan.json")
    entries = []
    for k, (start, end) in enumerate(segments):
        graphs = {}
        for fl in flavours:
            name = graph_file_name(k, fl)
            _plugin_graph(folder / name, aot=aot)
            graphs[fl] = FileRef.of(folder, name)
        engine = None
        if engines:
            (folder / engine_file_name(k)).write_bytes(b"engine %d" % k)
            engine = FileRef.of(folder, engine_file_name(k))
        entries.append(SegmentEntry(k, [start, end], timesteps[start:end], graphs, engine))
    inputs, outputs = io_spec(TRANSFORMER, TILE, TOKENS)
    manifest = Manifest(model_hash="0" * 64, precision="w4a4", plan=FileRef.of(folder, "bit_plan.json"),
                        sampler=asdict(PipelineConfig(num_inference_steps=steps, tile_size=TILE, tile_overlap=2)),
                        codec={"kind": "pixel_unshuffle", "factor": 2, "scaling": 2.0},
                        transformer={k: getattr(TRANSFORMER, k) for k in vars(TRANSFORMER)}, tile_latent=TILE,
                        text_tokens=TOKENS, segments=entries, inputs=[TensorSpec(**t) for t in inputs],
                        outputs=[TensorSpec(**t) for t in outputs])
    manifest.save(folder)
    return folder
