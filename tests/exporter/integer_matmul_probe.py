"""Run one cpu-flavour integer matmul (activation Q/DQ + per-channel INT8 weight DQ + MatMul, which onnxruntime
fuses into MatMulIntegerToFloat) on the codes in an .npz file; print its error against float64 as JSON.

    python integer_matmul_probe.py CODES.npz

numpy and onnxruntime only, so that it starts quickly under an emulator (test_cpu_flavour runs it under
`qemu-x86_64 -cpu Haswell`, a CPU without AVX-512 or VNNI, to exercise onnxruntime's AVX2 u8 x s8 kernel).
"""
import json
import sys

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def relative_error(act_codes: np.ndarray, act_scale: float, codes: np.ndarray, scales: np.ndarray) -> float:
    m, k = act_codes.shape
    inits = [numpy_helper.from_array(np.array(act_scale, np.float32), "sa"),
             numpy_helper.from_array(np.array(0, np.int8), "z"),
             numpy_helper.from_array(codes.astype(np.int8), "w"),            # [K, N]
             numpy_helper.from_array(scales.astype(np.float32), "sw")]       # [N]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sa", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sa", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "sw"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    x = (act_codes * np.float32(act_scale)).astype(np.float32)[None]
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": x})[0]
    ref = (act_codes.astype(np.float64) * np.float64(np.float32(act_scale))) @ (
        codes.astype(np.float64) * scales.astype(np.float32).astype(np.float64))
    return float(np.abs(y[0] - ref).max() / np.abs(ref).max())


def main(path: str) -> None:
    data = np.load(path)
    out = {name[len("codes_"):]: relative_error(data["act_codes"], float(data["act_scale"]), data[name],
                                                data["scales"]) for name in data.files if name.startswith("codes_")}
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
