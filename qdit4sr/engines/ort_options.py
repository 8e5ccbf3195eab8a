"""onnxruntime session settings per graph flavour: what each flavour needs to compute what it says.

    portable  ORT_ENABLE_BASIC: constant folding and eliminations only, so the graph runs as written
              (the extended levels fuse Q/DQ + MatMul into integer kernels).
    cpu       ORT_ENABLE_ALL: the flavour exists to be fused into MatMulIntegerToFloat (its weights are
              INT8 with codes <= 63, exact on every x86 kernel). onnxruntime also fuses a weight
              DequantizeLinear + MatMul without activation Q/DQ (layers with 16-bit activations) into
              MatMulNBits, which by default (accuracy level 4) quantizes the activations to int8 on the
              fly; `session.qdq_matmulnbits_accuracy_level=0` keeps that fusion in float32.
"""
from __future__ import annotations

from ..artifacts.flavour import Flavour

DEFAULT_LEVELS = {Flavour.PORTABLE: "ORT_ENABLE_BASIC", Flavour.CPU: "ORT_ENABLE_ALL"}  # what onnxruntime runs
CONFIG_ENTRIES = {Flavour.CPU: {"session.qdq_matmulnbits_accuracy_level": "0"}}


def session_options(flavour: Flavour | str, intra_op_num_threads: int | None = None,
                    graph_optimization_level: str | None = None, log_severity_level: int | None = None):
    """SessionOptions for running `flavour` graphs; level None = the flavour's default."""
    import onnxruntime as ort

    flavour = Flavour.parse(flavour)
    if flavour not in DEFAULT_LEVELS:
        raise ValueError(f"onnxruntime runs the {', '.join(map(str, DEFAULT_LEVELS))} graphs, not {flavour!s}")
    level = graph_optimization_level or DEFAULT_LEVELS[flavour]
    options = ort.SessionOptions()
    try:
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    except AttributeError as e:
        raise ValueError(f"unknown graph_optimization_level {level!r}") from e
    if intra_op_num_threads:
        options.intra_op_num_threads = int(intra_op_num_threads)
    if log_severity_level is not None:
        options.log_severity_level = log_severity_level
    for key, value in CONFIG_ENTRIES.get(flavour, {}).items():
        options.add_session_config_entry(key, value)
    return options
