"""TensorRT plugin layer: specs against the contract, launch configs against the kernels, the AOT PTX.

Without TensorRT the registration itself runs against a minimal stand-in of ``tensorrt.plugin`` that
checks what TensorRT's own validation checks (parameter names and order, annotations); the real
registration, engine build and GPU runs are marked ``tensorrt`` / ``cuda`` and skip here.
"""
import re
import shutil
import subprocess
import sys
import types
import typing

import numpy as np
import pytest

from qdit4sr.plugins import contract
from qdit4sr.plugins import trt_plugins as T


def _nvidia_backend() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


# --------------------------------------------------------------------------- contract-derived specs


def test_plugin_ids_follow_the_contract_namespace():
    assert T.PLUGIN_IDS == {"LowRankBranch": "qdit4sr::LowRankBranch", "BlockRank1Branch": "qdit4sr::BlockRank1Branch"}
    assert set(T.PLUGIN_IDS) == set(contract.PLUGIN_OPS) == set(T.KERNEL_OF_OP)


@pytest.mark.parametrize("op,expected", [
    ("LowRankBranch", (("rank", int), ("in_features", int), ("out_features", int))),
    ("BlockRank1Branch", (("block_out", int), ("block_in", int), ("in_features", int), ("out_features", int))),
])
def test_attribute_spec_is_the_contract_minus_parser_attributes(op, expected):
    assert T.plugin_attribute_spec(op) == expected
    spec = contract.PLUGIN_OPS[op]
    assert {a.name for a in spec.attributes} == {n for n, _ in expected} | set(T.PARSER_ATTRIBUTES)
    # Every field is an int attribute tied to an axis of the contract.
    assert all(spec.attribute(n).kind == "int" and spec.attribute(n).dim for n, _ in expected)


def test_attribute_spec_matches_the_nodes_the_exporter_writes():
    lowrank = contract.plugin_attributes("LowRankBranch", rank=8, in_features=64, out_features=96, aot=1)
    block = contract.plugin_attributes("BlockRank1Branch", block_out=32, block_in=16, in_features=64,
                                       out_features=96, aot=1)
    for op, attrs in (("LowRankBranch", lowrank), ("BlockRank1Branch", block)):
        fields = {n for n in attrs if n not in T.PARSER_ATTRIBUTES}
        assert fields == {n for n, _ in T.plugin_attribute_spec(op)}


def test_input_names_follow_the_contract():
    assert T.plugin_input_names("LowRankBranch") == ("x", "down", "up")
    assert T.plugin_input_names("BlockRank1Branch") == ("x", "sigma", "u", "v")
    with pytest.raises(KeyError, match="unknown plugin op"):
        T.plugin_input_names("Nope")


LOWRANK = dict(rank=8, in_features=64, out_features=96)
BLOCK = dict(block_out=32, block_in=16, in_features=64, out_features=96)


@pytest.mark.parametrize("x", [[5, 64], [2, 7, 64], ["batch", 100, 64], [None, 64], [64]])
def test_output_shape_keeps_leading_dims(x):
    assert T.plugin_output_shape("LowRankBranch", [x, [8, 64], [96, 8]], LOWRANK) == x[:-1] + [96]
    shapes = {"x": x, "sigma": [3, 4], "u": [3, 4, 32], "v": [3, 4, 16]}
    assert T.plugin_output_shape("BlockRank1Branch", shapes, BLOCK) == x[:-1] + [96]


@pytest.mark.parametrize("op,shapes,attrs,match", [
    ("LowRankBranch", [[5, 63], [8, 64], [96, 8]], LOWRANK, "in_features"),
    ("LowRankBranch", [[5, 64], [4, 64], [96, 8]], LOWRANK, "rank"),
    ("LowRankBranch", [[5, 64], [8, 64], [90, 8]], LOWRANK, "out_features"),
    ("LowRankBranch", [[5, 64], [8, 64]], LOWRANK, "takes 3 inputs"),
    ("LowRankBranch", [[5, 64], [8, 64], [96, 8]], dict(rank=8, in_features=64), "needs the attributes"),
    ("LowRankBranch", [[5, 64], [8, 64], [96, 8]], dict(LOWRANK, rank=0), "positive int"),
    ("LowRankBranch", [[5, 64], [8, 64], [96, 8]], dict(LOWRANK, block_in=2), "no attributes"),
    ("BlockRank1Branch", [[5, 64], [3, 4], [3, 4, 32], [3, 4, 8]], BLOCK, "block_in"),
    ("BlockRank1Branch", [[5, 64], [3, 4], [3, 4, 32], [3, 4, 16]], dict(BLOCK, out_features=64), "N="),
])
def test_output_shape_rejects_what_the_contract_rejects(op, shapes, attrs, match):
    with pytest.raises(ValueError, match=match):
        T.plugin_output_shape(op, shapes, attrs)


def test_output_dims_is_generic():
    assert T.output_dims(("a", "b", 7), "N") == ["a", "b", "N"]
    with pytest.raises(ValueError):
        T.output_dims((), 3)


# --------------------------------------------------------------------------- launch configurations


def test_lowrank_launch_config():
    c = T.lowrank_launch_config(32, 1536, 6144)
    assert c.kernel == "lowrank_branch" and c.threads == 128
    assert c.constexpr_dict == {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_R": 32, "PRECISION": "tf32x3"}
    assert c.scalars == (("M", None), ("N", 6144), ("K", 1536), ("R", 32))
    assert c.scalar_values(4762) == [4762, 6144, 1536, 32]
    assert c.grid(4762) == (96, 75)  # cdiv(6144, 64), cdiv(2 x 2381 tokens, 64)
    assert c.inputs == ("x_ptr", "down_ptr", "up_ptr") and c.outputs == ("y_ptr",)
    assert T.lowrank_launch_config(5, 64, 64).constexpr_dict["BLOCK_R"] == 16   # tl.dot needs >= 16
    assert T.lowrank_launch_config(33, 64, 64).constexpr_dict["BLOCK_R"] == 64


def test_block_rank1_launch_config_uses_the_wrappers_tiling():
    kernels = pytest.importorskip("qdit4sr.plugins.kernels", reason="triton is not installed")
    for s_o, s_i, n, k in [(128, 128, 6144, 1536), (96, 48, 1536, 6144), (32, 16, 96, 64)]:
        c = T.block_rank1_launch_config(s_o, s_i, k, n)
        tiling = kernels.block_branch_constexprs(n, k, s_o, s_i, 64, 64)
        assert {k_: c.constexpr_dict[k_] for k_ in tiling} == tiling
        assert c.scalars == (("M", None), ("N", n), ("K", k), ("P", n // s_o), ("Q", k // s_i), ("S_O", s_o),
                             ("S_I", s_i))
        assert c.inputs == ("x_ptr", "sigma_ptr", "u_ptr", "v_ptr")
    with pytest.raises(ValueError, match="tile"):
        T.block_rank1_launch_config(40, 16, 64, 96)


def test_launch_config_dispatch_and_validation():
    assert T.launch_config("LowRankBranch", LOWRANK) == T.lowrank_launch_config(8, 64, 96)
    with pytest.raises(ValueError, match="power of two"):
        T.lowrank_launch_config(8, 64, 96, block_m=48)
    with pytest.raises(ValueError, match="positive int"):
        T.lowrank_launch_config(8, -1, 96)


def test_grid_symbolic_rows_and_limits():
    c = T.lowrank_launch_config(8, 64, 96)
    calls = []
    gx, gy = c.grid("M", cdiv=lambda m, b: calls.append((m, b)) or f"cdiv({m},{b})")
    assert (gx, gy) == (2, "cdiv(M,64)") and calls == [("M", 64)]
    with pytest.raises(ValueError, match="cdiv"):
        c.grid("M")
    with pytest.raises(ValueError, match="grid.y"):
        c.grid(64 * 65535 + 1)


def test_argument_order_follows_the_kernel_signatures():
    ptx = pytest.importorskip("qdit4sr.plugins.ptx")
    pytest.importorskip("triton", reason="triton is not installed")
    for config in (T.lowrank_launch_config(8, 64, 96), T.block_rank1_launch_config(32, 16, 64, 96)):
        params = ptx.kernel_params(config.kernel)
        order = T.trt_argument_order(config, params)
        names = [params[i][0] for i in order]
        # TensorRT's AOT convention: inputs, extra scalars, outputs.
        assert names == [*config.inputs, *(n for n, _ in config.scalars), *config.outputs]
        assert sorted(order) == list(range(len(params)))


def test_argument_order_rejects_signature_drift():
    c = T.lowrank_launch_config(8, 64, 96)
    good = [("x_ptr", "*fp32"), ("down_ptr", "*fp32"), ("up_ptr", "*fp32"), ("y_ptr", "*fp32"),
            ("M", "i32"), ("N", "i32"), ("K", "i32"), ("R", "i32")]
    assert T.trt_argument_order(c, good) == (0, 1, 2, 4, 5, 6, 7, 3)
    with pytest.raises(ValueError, match="scalars"):
        T.trt_argument_order(c, good[:4] + [("N", "i32"), ("M", "i32"), ("K", "i32"), ("R", "i32")])
    with pytest.raises(ValueError, match="pointers"):
        T.trt_argument_order(c, [("x_ptr", "*fp32"), ("bias_ptr", "*fp32")] + good[2:])
    with pytest.raises(ValueError, match="SymInt32"):
        T.trt_argument_order(c, good[:7] + [("R", "fp32")])


# --------------------------------------------------------------------------- PTX rewriting


def _fake_ptx(name: str, types_: list[str]) -> str:
    decls = ",\n".join(f"\t.param {t} {name}_param_{i}" for i, t in enumerate(types_))
    body = "\n".join(f"\tld.param.b64 %rd{i}, [{name}_param_{i}];" for i in range(len(types_)))
    return f".version 8.4\n.target sm_90a\n.visible .entry {name}(\n{decls}\n)\n.reqntid 128\n{{\n{body}\n\tret;\n}}\n"


def test_reorder_ptx_params_moves_declarations_only():
    types_ = [".u64 .ptr .global .align 1"] * 4 + [".u32"] * 4 + [".u64 .ptr .global .align 1"] * 2
    ptx = _fake_ptx("k", types_)
    out = T.reorder_ptx_params(ptx, "k", (0, 1, 2, 4, 5, 6, 7, 3))
    params = T.ptx_entry_params(out, "k")
    assert [p.rsplit("_", 1)[1] for p in params] == ["0", "1", "2", "4", "5", "6", "7", "3", "8", "9"]
    assert params[7] == ".param .u64 .ptr .global .align 1 k_param_3"
    assert out.split("{", 1)[1] == ptx.split("{", 1)[1]  # the body is untouched
    assert T.reorder_ptx_params(ptx, "k", range(10)) .count("k_param_") == ptx.count("k_param_")


def test_reorder_ptx_params_rejects_bad_input():
    ptx = _fake_ptx("k", [".u32"] * 3)
    with pytest.raises(ValueError, match="permutation"):
        T.reorder_ptx_params(ptx, "k", (0, 0, 1))
    with pytest.raises(ValueError, match="permutation"):
        T.reorder_ptx_params(ptx, "k", (0, 1, 2, 3))
    with pytest.raises(ValueError, match="one .entry"):
        T.reorder_ptx_params(ptx, "other", (0,))
    with pytest.raises(ValueError, match="unexpected parameter"):
        T.reorder_ptx_params(ptx.replace("k_param_1", "k_param_9"), "k", (0, 1, 2))


@pytest.mark.parametrize("cap,arch", [((9, 0), 90), ((8, 0), 80), ((8, 6), 80), ((8, 9), 80), ((10, 0), 80),
                                      ((12, 0), 80)])
def test_select_ptx_arch(cap, arch):
    assert T.select_ptx_arch(cap) == arch
    from qdit4sr.plugins.ptx import SUPPORTED_ARCHS

    assert arch in SUPPORTED_ARCHS


def test_select_ptx_arch_rejects_pre_ampere():
    with pytest.raises(ValueError, match="8.0"):
        T.select_ptx_arch((7, 5))


# --------------------------------------------------------------------------- real AOT PTX (no GPU)



@pytest.fixture(scope="module")
def aot_kernels():
    """Both plugin kernels compiled for sm_90 with the DiT4SR widths, once (about 5 s)."""
    pytest.importorskip("triton", reason="triton is not installed; PTX cannot be compiled")
    if not _nvidia_backend():
        pytest.skip("triton has no NVIDIA backend on this machine; PTX cannot be compiled")
    configs = {"LowRankBranch": T.lowrank_launch_config(32, 1536, 6144),
               "BlockRank1Branch": T.block_rank1_launch_config(128, 128, 1536, 6144)}
    return {op: (c, T.compile_aot_kernel(c, 90)) for op, c in configs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("op", ["LowRankBranch", "BlockRank1Branch"])
def test_aot_ptx_takes_tensorrt_argument_order(aot_kernels, op):
    config, kernel = aot_kernels[op]
    assert kernel.name == config.kernel + "_kernel" and kernel.arch == 90
    params = T.ptx_entry_params(kernel.ptx, kernel.name)
    n_in, n_sc = len(config.inputs), len(config.scalars)
    kinds = ["ptr" if ".ptr" in p else "u32" for p in params]
    # inputs, i32 scalars, the output, then Triton's two scratch pointers (TensorRT passes null).
    assert kinds == ["ptr"] * n_in + ["u32"] * n_sc + ["ptr"] * 3
    assert params[n_in + n_sc].endswith(f"_param_{n_in}")  # the kernel's y_ptr, moved behind the scalars
    assert re.search(rf"\.reqntid {config.threads}\b", kernel.ptx), "block_x must equal the compiled thread count"
    assert 0 < kernel.shared <= T.MAX_STATIC_SHARED_BYTES
    assert T.compile_aot_kernel(config, 90) is kernel  # cached per specialisation


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("ptxas") is None, reason="ptxas is not on PATH")
@pytest.mark.parametrize("op", ["LowRankBranch", "BlockRank1Branch"])
def test_ptxas_accepts_reordered_ptx(aot_kernels, op, tmp_path):
    _, kernel = aot_kernels[op]
    src = tmp_path / "k.ptx"
    src.write_text(kernel.ptx)
    target = re.search(r"^\.target (sm_\w+)", kernel.ptx, re.MULTILINE).group(1)
    proc = subprocess.run(["ptxas", f"-arch={target}", str(src), "-o", str(tmp_path / "k.cubin")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


# --------------------------------------------------------------------------- registration (stand-in TensorRT)


class FakeExpr:
    """A symbolic dimension: records products, like tensorrt.plugin.ShapeExpr."""

    def __init__(self, text):
        self.text = str(text)

    def __mul__(self, other):
        return FakeExpr(f"{self.text}*{getattr(other, 'text', other)}")

    def __eq__(self, other):
        return isinstance(other, FakeExpr) and other.text == self.text

    def __repr__(self):
        return self.text


class FakeTensorDesc:
    def __init__(self, shape_expr=(), dtype=None):
        self.shape_expr = list(shape_expr)
        self.dtype = dtype

    @property
    def ndim(self):
        return len(self.shape_expr)


class FakeSymInt32:
    def __init__(self, value):
        self.value = value


def _fake_tensorrt(registry: dict):
    trt = types.ModuleType("tensorrt")
    trt.float32 = "float32"
    trtp = types.ModuleType("tensorrt.plugin")

    def decorator(kind):
        def make(plugin_id):
            def wrap(fn):
                registry.setdefault(plugin_id, {})[kind] = fn
                return fn
            return wrap
        return make

    trtp.register, trtp.impl, trtp.aot_impl = decorator("register"), decorator("impl"), decorator("aot_impl")
    trtp.TensorDesc = FakeTensorDesc
    trtp.Tensor = type("Tensor", (), {})
    trtp.KernelLaunchParams = type("KernelLaunchParams", (), {})
    trtp.SymExprs = type("SymExprs", (), {})
    trtp.SymIntExprs = type("SymIntExprs", (trtp.SymExprs,), {"from_tuple": classmethod(lambda cls, t: list(t))})
    trtp.SymInt32 = FakeSymInt32
    trtp.cdiv = lambda a, b: f"cdiv({a},{b})"
    trtp.from_shape_expr = lambda dims, dtype: FakeTensorDesc(dims, dtype)
    trt.plugin = trtp
    return trt, trtp


@pytest.fixture
def fake_registry(monkeypatch):
    registry: dict = {}
    trt, trtp = _fake_tensorrt(registry)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    monkeypatch.setattr(T, "_REGISTERED", False)
    T.register_plugins()
    T.register_plugins()  # idempotent: a second call registers nothing
    return registry, trtp


def _schema(fn) -> str:
    import inspect

    return f"({', '.join(inspect.signature(fn).parameters)})"


@pytest.mark.parametrize("op", ["LowRankBranch", "BlockRank1Branch"])
def test_registered_signatures_match_tensorrt_schemas(fake_registry, op):
    """The schemas tensorrt.plugin's validation demands: inputs, attributes, then outputs+stream / outputs+tactic."""
    import inspect

    registry, trtp = fake_registry
    fns = registry[T.PLUGIN_IDS[op]]
    assert set(fns) == {"register", "impl", "aot_impl"}
    inputs = list(T.plugin_input_names(op))
    attrs = [n for n, _ in T.plugin_attribute_spec(op)]
    assert _schema(fns["register"]) == f"({', '.join(inputs + attrs)})"
    assert _schema(fns["impl"]) == f"({', '.join(inputs + attrs + ['outputs', 'stream'])})"
    assert _schema(fns["aot_impl"]) == f"({', '.join(inputs + attrs + ['outputs', 'tactic'])})"
    reg = inspect.signature(fns["register"])
    assert [reg.parameters[n].annotation for n in inputs] == [trtp.TensorDesc] * len(inputs)
    assert [reg.parameters[n].annotation for n in attrs] == [t for _, t in T.plugin_attribute_spec(op)]
    assert reg.return_annotation is trtp.TensorDesc
    impl = inspect.signature(fns["impl"])
    assert typing.get_args(impl.parameters["outputs"].annotation) == (trtp.Tensor,)
    aot = inspect.signature(fns["aot_impl"])
    ret = typing.get_args(aot.return_annotation)
    assert len(ret) == 4 and ret[2] is trtp.KernelLaunchParams and issubclass(ret[3], trtp.SymExprs)
    assert typing.get_args(ret[0]) == (str, bytes) and typing.get_args(ret[1]) == (str, bytes)


def test_registered_descriptor_computes_the_contract_shape(fake_registry):
    registry, _ = fake_registry
    b, t = FakeExpr("B"), FakeExpr("T")
    out = registry["qdit4sr::LowRankBranch"]["register"](FakeTensorDesc([b, t, 64]), FakeTensorDesc([8, 64]),
                                                        FakeTensorDesc([96, 8]), 8, 64, 96)
    assert out.shape_expr == [b, t, 96] and out.dtype == "float32"
    out = registry["qdit4sr::BlockRank1Branch"]["register"](FakeTensorDesc([b, 64]), None, None, None, 32, 16, 64, 96)
    assert out.shape_expr == [b, 96]


@pytest.mark.parametrize("op,attrs,scalars", [
    ("LowRankBranch", (8, 64, 96), [96, 64, 8]),
    ("BlockRank1Branch", (32, 16, 64, 96), [96, 64, 3, 4, 32, 16]),
])
def test_registered_aot_impl_launch(fake_registry, monkeypatch, op, attrs, scalars):
    registry, trtp = fake_registry
    compiled = []

    def fake_compile(config, arch):
        compiled.append((config, arch))
        return T.AotKernel(name=f"{config.kernel}_kernel", ptx="// ptx", arch=arch, num_warps=config.num_warps,
                           num_stages=1, shared=12345)

    monkeypatch.setattr(T, "compile_aot_kernel", fake_compile)
    monkeypatch.setattr(T, "_current_arch", lambda: 90)
    x = FakeTensorDesc([FakeExpr("B"), FakeExpr("T"), 64])
    n_in = len(T.plugin_input_names(op))
    name, ptx, launch, extra = registry[T.PLUGIN_IDS[op]]["aot_impl"](x, *([None] * (n_in - 1)), *attrs, (None,), 0)
    config = T.launch_config(op, dict(zip([n for n, _ in T.plugin_attribute_spec(op)], attrs)))
    assert compiled == [(config, 90)]
    assert name == f"{T.KERNEL_OF_OP[op]}_kernel".encode() and ptx == b"// ptx"
    assert launch.grid_x == 2 and launch.grid_y == "cdiv(B*T,64)"
    assert launch.block_x == 128 and launch.shared_mem == 12345
    assert [e.value for e in extra] == [FakeExpr("B*T")] + scalars


def test_rows_of_a_2d_and_1d_input():
    assert T._rows(FakeTensorDesc([FakeExpr("B"), 64])) == FakeExpr("B")
    assert T._rows(FakeTensorDesc([64])) == 1


# --------------------------------------------------------------------------- TensorRT / GPU (skip here)


@pytest.mark.cuda
@pytest.mark.parametrize("op", ["LowRankBranch", "BlockRank1Branch"])
def test_jit_impl_matches_reference_on_gpu(op):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from qdit4sr.plugins import kernels

    K = kernels.load_kernel_module(interpret=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 37, 64, generator=g)
    if op == "LowRankBranch":
        weights = [torch.randn(8, 64, generator=g), torch.randn(96, 8, generator=g)]
        ref = K.lowrank_reference(x, *weights)
    else:
        weights = [torch.rand(3, 4, generator=g), torch.randn(3, 4, 32, generator=g), torch.randn(3, 4, 16, generator=g)]
        ref = K.block_rank1_reference(x, *weights)
    out = torch.empty(2, 37, 96, device="cuda")
    stream = torch.cuda.Stream()
    T._run_jit(op, [t.cuda() for t in [x, *weights]], out, stream.cuda_stream)
    stream.synchronize()
    assert (out.cpu().double() - ref).abs().max() <= 1e-4 * (1 + ref.abs().max())


@pytest.mark.tensorrt
@pytest.mark.cuda
@pytest.mark.parametrize("op", ["LowRankBranch", "BlockRank1Branch"])
def test_aot_plugin_engine_matches_reference(op, tmp_path):
    """A one-node ONNX graph with the plugin (aot=1) -> strongly typed engine -> run, against float64."""
    pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import onnx
    import tensorrt as trt

    from qdit4sr.plugins import kernels

    T.register_plugins()
    rng = np.random.default_rng(0)
    if op == "LowRankBranch":
        attrs, weights = LOWRANK, {"down": rng.standard_normal((8, 64)), "up": rng.standard_normal((96, 8))}
    else:
        attrs, weights = BLOCK, {"sigma": rng.random((3, 4)), "u": rng.standard_normal((3, 4, 32)),
                                 "v": rng.standard_normal((3, 4, 16))}
    weights = {k: v.astype(np.float32) for k, v in weights.items()}
    node = contract.make_plugin_node(op, ["x", *weights], ["y"], name=op, aot=1, **attrs)
    graph = onnx.helper.make_graph(
        [node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 37, 64])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 37, 96])],
        [onnx.numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21), contract.domain_opset()])
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path))

    from qdit4sr.engines import build as B

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = B._trt_create_network(trt, builder)
    B._trt_parse_onnx(trt, network, logger, path, segment=0)
    config = B._trt_builder_config(trt, builder, B.EngineBuildConfig(workspace_bytes=1 << 28))
    B._trt_add_profile(builder, config, {"x": B.ProfileShapes((1, 37, 64), (2, 37, 64), (4, 37, 64))})
    plan = builder.build_serialized_network(network, config)
    assert plan is not None
    engine = trt.Runtime(logger).deserialize_cuda_engine(bytes(memoryview(plan)))
    context = engine.create_execution_context()
    x = torch.from_numpy(rng.standard_normal((2, 37, 64)).astype(np.float32)).cuda()
    y = torch.empty(2, 37, 96, device="cuda")
    context.set_input_shape("x", tuple(x.shape))
    context.set_tensor_address("x", x.data_ptr())
    context.set_tensor_address("y", y.data_ptr())
    stream = torch.cuda.Stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    w = [torch.from_numpy(v) for v in weights.values()]
    ref = (kernels.lowrank_reference if op == "LowRankBranch" else kernels.block_rank1_reference)(x.cpu(), *w)
    assert (y.cpu().double() - ref).abs().max() <= 1e-4 * (1 + ref.abs().max())
