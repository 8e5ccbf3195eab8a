"""TensorRT plugins for the side branches: ``qdit4sr::LowRankBranch`` and ``qdit4sr::BlockRank1Branch``.

``register_plugins()`` registers both ops with TensorRT's Python plugin API (``tensorrt.plugin``,
TensorRT >= 10.9 for ``aot_impl``):

    @trtp.register   output shape = x's leading dims + [out_features], float32 (contract.py)
    @trtp.impl       JIT: runs the Triton kernels through torch on TensorRT's stream (needs Python at run time)
    @trtp.aot_impl   AOT: returns the Triton kernel compiled to PTX plus launch parameters; TensorRT bakes
                     the PTX into the engine, so the engine runs without Python (trtexec, C++ IRuntime)

The ONNX parser maps a ``qdit4sr`` node to the plugin by op type == plugin name and the
``plugin_namespace`` / ``plugin_version`` attributes, and picks ``aot_impl`` when the node carries
``aot=1`` (what the exporter's trt flavour writes). Those three attributes are consumed by the parser;
the others (``plugin_attribute_spec``) become plugin fields.

AOT launch convention. TensorRT launches an AOT kernel with the arguments
``(input pointers..., extra scalar arguments..., output pointers...)`` followed by nulls for any
trailing parameters it was not given (Triton's global/profile scratch pointers, which must then be
unused: sizes 0). The Triton kernels of ``kernels.py`` declare ``(x, weights..., y, M, N, K, ...)``,
i.e. the output before the scalars, so ``reorder_ptx_params`` rewrites the PTX entry's parameter
*declarations* into TensorRT's order. PTX refers to parameters by name (``ld.param [name]``), so
moving declarations changes only the argument order of the ABI, never the kernel body.

Extra scalar arguments are ``trtp.SymInt32``: the row count M = product of x's leading dims is
symbolic (resolved per execution), the others are constants from the plugin attributes. The grid is
(cdiv(N, BLOCK_N), cdiv(M, BLOCK_M)) programs of ``num_warps * 32`` threads (the kernels use
program_id(0) for N tiles and program_id(1) for M tiles), with the compiled kernel's shared memory;
stages are reduced until that fits in 48 KiB, the launch limit without an opt-in attribute.

Everything except ``register_plugins`` and the three decorated functions is plain Python and is
tested without TensorRT or a GPU.
"""
import functools
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, Tuple, Union

from ..checks import check_int, is_int
from . import contract
from .tiles import check_tile, pow2_at_least

__all__ = [
    "PLUGIN_IDS",
    "PARSER_ATTRIBUTES",
    "KERNEL_OF_OP",
    "MAX_STATIC_SHARED_BYTES",
    "LaunchConfig",
    "AotKernel",
    "plugin_attribute_spec",
    "plugin_input_names",
    "output_dims",
    "plugin_output_shape",
    "lowrank_launch_config",
    "block_rank1_launch_config",
    "launch_config",
    "trt_argument_order",
    "reorder_ptx_params",
    "ptx_entry_params",
    "select_ptx_arch",
    "compile_aot_kernel",
    "register_plugins",
    "plugins_registered",
]

PLUGIN_IDS: dict[str, str] = {name: f"{contract.PLUGIN_NAMESPACE}::{name}" for name in contract.PLUGIN_OPS}
# Node attributes the TensorRT ONNX parser reads itself; they are not plugin fields.
PARSER_ATTRIBUTES = ("plugin_namespace", "plugin_version", contract.TRT_FLAVOUR_AOT_ATTRIBUTE)
KERNEL_OF_OP = {"LowRankBranch": "lowrank_branch", "BlockRank1Branch": "block_rank1_branch"}
# The kernels' pointer parameter for each contract tensor.
_POINTER_PARAM = {"x": "x_ptr", "down": "down_ptr", "up": "up_ptr", "sigma": "sigma_ptr", "u": "u_ptr",
                  "v": "v_ptr", "y": "y_ptr"}
# Dynamic shared memory a launch may use without cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES);
# whether TensorRT's AOT launcher opts in beyond it is not documented, so the AOT kernels stay below.
MAX_STATIC_SHARED_BYTES = 48 * 1024
MAX_GRID_Y = 65535  # CUDA limit of gridDim.y, which counts the M tiles
_KINDS: dict[str, type] = {"int": int, "string": str}


# =========================================================================== contract-derived specs


def _op(op: str) -> contract.PluginOp:
    if op not in contract.PLUGIN_OPS:
        raise KeyError(f"unknown plugin op {op!r}; known: {sorted(contract.PLUGIN_OPS)}")
    return contract.PLUGIN_OPS[op]


def plugin_attribute_spec(op: str) -> tuple[tuple[str, type], ...]:
    """(name, Python type) of the plugin fields of ``op``, in contract order (parser attributes excluded).

    These are the attribute parameters of the ``@trtp.register`` function, so the ONNX parser passes
    exactly these node attributes to the plugin creator.
    """
    return tuple((a.name, _KINDS[a.kind]) for a in _op(op).attributes if a.name not in PARSER_ATTRIBUTES)


def plugin_input_names(op: str) -> tuple[str, ...]:
    return tuple(t.name for t in _op(op).inputs)


def output_dims(x_dims: Sequence[Any], out_features: Any) -> list[Any]:
    """The output shape rule shared by the TensorRT descriptor and ``plugin_output_shape``:
    x's leading dims (ints, None, or TensorRT shape expressions) followed by out_features."""
    if len(x_dims) < 1:
        raise ValueError("x must have at least one axis (the feature axis)")
    return [*list(x_dims)[:-1], out_features]


def _check_attribute_values(op: str, attrs: Mapping[str, Any]) -> dict[str, int]:
    spec = plugin_attribute_spec(op)
    missing = [name for name, _ in spec if name not in attrs]
    if missing:
        raise ValueError(f"{op} needs the attributes {missing}")
    unknown = sorted(set(attrs) - {name for name, _ in spec} - set(PARSER_ATTRIBUTES))
    if unknown:
        raise ValueError(f"{op} has no attributes {unknown}; its fields are {[n for n, _ in spec]}")
    values = {}
    for name, kind in spec:
        value = attrs[name]
        values[name] = check_int(f"{op} attribute {name}", value) if kind is int else value
    return values


def plugin_output_shape(op: str, input_shapes: Sequence[Sequence[int | str | None]] | Mapping[str, Sequence],
                        attrs: Mapping[str, Any]) -> list[int | str | None]:
    """Output shape of plugin ``op`` for its inputs' shapes (in contract order, or by contract name).

    Unknown (None) or symbolic (str) axes are allowed and passed through. The shapes and attribute
    values are checked with ``contract.check_plugin_node`` itself, so this rule cannot drift from
    what the exporter and the lint accept.
    """
    spec = _op(op)
    names = [t.name for t in spec.inputs]
    if isinstance(input_shapes, Mapping):
        unknown = sorted(set(input_shapes) - set(names))
        if unknown:
            raise ValueError(f"{op} has no inputs {unknown}; its inputs are {names}")
        missing = [n for n in names if n not in input_shapes]
        if missing:
            raise ValueError(f"{op} needs the shapes of {missing}")
        shapes = [list(input_shapes[n]) for n in names]
    else:
        shapes = [list(s) for s in input_shapes]
        if len(shapes) != len(names):
            raise ValueError(f"{op} takes {len(names)} inputs ({', '.join(names)}), got {len(shapes)} shapes")
    values = _check_attribute_values(op, attrs)
    node = contract.make_plugin_node(op, names, ["y"], name=op, **values)
    known = {n: [d if is_int(d) else None for d in s] for n, s in zip(names, shapes)}
    problems = contract.check_plugin_node(node, known)
    if problems:
        raise ValueError(f"{op}: " + "; ".join(problems))
    return output_dims(shapes[0], values["out_features"])


# =========================================================================== launch configuration


@dataclass(frozen=True)
class LaunchConfig:
    """How one plugin op launches its Triton kernel: the specialisation and the launch geometry."""

    op: str
    kernel: str                                     # ptx / kernels.KERNELS name
    constexprs: tuple[tuple[str, Any], ...]         # the kernel's constexpr values
    num_warps: int
    num_stages: int
    block_m: int
    block_n: int
    out_features: int
    # Runtime scalars in kernel declaration order; value None marks M, the rows (symbolic at build time).
    scalars: tuple[tuple[str, int | None], ...]
    inputs: tuple[str, ...] = field(default=())      # kernel pointer params of the op inputs, in op order
    outputs: tuple[str, ...] = field(default=("y_ptr",))

    @property
    def constexpr_dict(self) -> dict[str, Any]:
        return dict(self.constexprs)

    @property
    def threads(self) -> int:
        """block_x of the launch (Triton kernels are 1-D thread blocks of num_warps warps)."""
        return self.num_warps * 32

    def scalar_values(self, m: Any) -> list[Any]:
        """The extra kernel arguments in TensorRT's order (the kernels' scalar order), M substituted."""
        return [m if value is None else value for _, value in self.scalars]

    def grid(self, m: Any, cdiv: Callable[[Any, int], Any] | None = None) -> tuple[Any, Any]:
        """(grid_x, grid_y) = (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M)); ``cdiv`` handles a symbolic M."""
        gx = -(-self.out_features // self.block_n)
        if is_int(m):
            gy = -(-m // self.block_m)
            if gy > MAX_GRID_Y:
                raise ValueError(f"{m} rows need {gy} row tiles, beyond CUDA's grid.y limit {MAX_GRID_Y}; "
                                 f"split the batch")
            return gx, gy
        if cdiv is None:
            raise ValueError("a symbolic row count needs a cdiv function (tensorrt.plugin.cdiv)")
        return gx, cdiv(m, self.block_m)


def lowrank_launch_config(rank: int, in_features: int, out_features: int, *, block_m: int = 64,
                          block_n: int = 64, block_k: int = 64, num_warps: int = 4, num_stages: int = 2,
                          precision: str = "tf32x3") -> LaunchConfig:
    """Launch of ``lowrank_branch_kernel`` for LowRankBranch(rank, in_features, out_features)."""
    r, k, n = check_int("rank", rank), check_int("in_features", in_features), check_int("out_features", out_features)
    for name, value in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        check_tile(name, value)
    constexprs = (("BLOCK_M", block_m), ("BLOCK_N", block_n), ("BLOCK_K", block_k),
                  ("BLOCK_R", pow2_at_least(r)), ("PRECISION", precision))
    return LaunchConfig(op="LowRankBranch", kernel=KERNEL_OF_OP["LowRankBranch"], constexprs=constexprs,
                        num_warps=check_int("num_warps", num_warps), num_stages=check_int("num_stages", num_stages),
                        block_m=block_m, block_n=block_n, out_features=n,
                        scalars=(("M", None), ("N", n), ("K", k), ("R", r)),
                        inputs=tuple(_POINTER_PARAM[t] for t in plugin_input_names("LowRankBranch")))


def block_rank1_launch_config(block_out: int, block_in: int, in_features: int, out_features: int, *,
                              block_m: int = 64, block_n: int = 64, block_k: int = 64, num_warps: int = 4,
                              num_stages: int = 2, precision: str = "tf32x3") -> LaunchConfig:
    """Launch of ``block_rank1_branch_kernel`` for BlockRank1Branch(block_out, block_in, in_features, out_features)."""
    s_o, s_i = check_int("block_out", block_out), check_int("block_in", block_in)
    k, n = check_int("in_features", in_features), check_int("out_features", out_features)
    if n % s_o or k % s_i:
        raise ValueError(f"blocks {s_o}x{s_i} must tile the {n}x{k} weight (out_features % block_out == 0 and "
                         f"in_features % block_in == 0)")
    for name, value in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        check_tile(name, value)
    tiling = _block_branch_constexprs(n, k, s_o, s_i, block_n, block_k)
    constexprs = (("BLOCK_M", block_m), ("BLOCK_N", block_n), ("BLOCK_K", block_k),
                  ("BLOCKS_K", tiling["BLOCKS_K"]), ("BLOCK_T", tiling["BLOCK_T"]), ("PRECISION", precision))
    return LaunchConfig(op="BlockRank1Branch", kernel=KERNEL_OF_OP["BlockRank1Branch"], constexprs=constexprs,
                        num_warps=check_int("num_warps", num_warps), num_stages=check_int("num_stages", num_stages),
                        block_m=block_m, block_n=block_n, out_features=n,
                        scalars=(("M", None), ("N", n), ("K", k), ("P", n // s_o), ("Q", k // s_i),
                                 ("S_O", s_o), ("S_I", s_i)),
                        inputs=tuple(_POINTER_PARAM[t] for t in plugin_input_names("BlockRank1Branch")))


def _block_branch_constexprs(n: int, k: int, s_o: int, s_i: int, block_n: int, block_k: int) -> dict[str, int]:
    """BLOCKS_K / BLOCK_T exactly as the torch wrappers compute them (kernels.block_branch_constexprs)."""
    from . import kernels  # imports triton; the AOT build has it anyway

    return kernels.block_branch_constexprs(n, k, s_o, s_i, block_n, block_k)


def launch_config(op: str, attrs: Mapping[str, Any], **options: Any) -> LaunchConfig:
    """The launch of plugin ``op`` for its (validated) plugin fields."""
    values = _check_attribute_values(op, attrs)
    if op == "LowRankBranch":
        return lowrank_launch_config(values["rank"], values["in_features"], values["out_features"], **options)
    return block_rank1_launch_config(values["block_out"], values["block_in"], values["in_features"],
                                     values["out_features"], **options)


def trt_argument_order(config: LaunchConfig, params: Sequence[tuple[str, str]]) -> tuple[int, ...]:
    """Indices into the kernel's runtime ``params`` (ptx.kernel_params) in TensorRT's AOT argument order.

    Checks that the kernel's pointers are exactly the op's inputs and output and that its scalars are
    the config's extra arguments in the same order, so a kernel signature change fails the build
    instead of launching with shifted arguments.
    """
    names = [name for name, _ in params]
    types = dict(params)
    pointers = [n for n in names if types[n].startswith("*")]
    scalars = [n for n in names if not types[n].startswith("*")]
    expected_ptrs = list(config.inputs) + list(config.outputs)
    if sorted(pointers) != sorted(expected_ptrs):
        raise ValueError(f"{config.kernel}: kernel pointers {pointers} are not the plugin's inputs and outputs "
                         f"{expected_ptrs}")
    if scalars != [n for n, _ in config.scalars]:
        raise ValueError(f"{config.kernel}: kernel scalars {scalars} differ from the plugin's extra arguments "
                         f"{[n for n, _ in config.scalars]}")
    bad = [n for n in scalars if types[n] != "i32"]
    if bad:
        raise ValueError(f"{config.kernel}: scalars {bad} are not i32; TensorRT AOT extra arguments are SymInt32")
    order = list(config.inputs) + scalars + list(config.outputs)
    return tuple(names.index(n) for n in order)


# =========================================================================== PTX


def _entry(ptx: str, entry: str) -> re.Match:
    matches = list(re.finditer(rf"\.entry\s+{re.escape(entry)}\s*\(([^)]*)\)", ptx))
    if len(matches) != 1:
        raise ValueError(f"expected one .entry {entry}(...) in the PTX, found {len(matches)}")
    return matches[0]


def ptx_entry_params(ptx: str, entry: str) -> list[str]:
    """The parameter declarations of ``.entry entry(...)``, in ABI order (e.g. '.param .u32 k_param_4')."""
    return [d.strip() for d in _entry(ptx, entry).group(1).split(",") if d.strip()]


def reorder_ptx_params(ptx: str, entry: str, order: Sequence[int]) -> str:
    """Reorder the first len(order) parameter declarations of ``entry``; the rest (scratch) stay last.

    ``order[j]`` is the declaration index that becomes ABI argument j. The body is untouched: it
    loads parameters by name, so only the order in which the launcher's arguments bind changes.
    """
    match = _entry(ptx, entry)
    decls = [d.strip() for d in match.group(1).split(",") if d.strip()]
    for i, decl in enumerate(decls):
        if not decl.endswith(f"{entry}_param_{i}"):
            raise ValueError(f"unexpected parameter declaration {i} of {entry}: {decl!r}")
    if sorted(order) != list(range(len(order))) or len(order) > len(decls):
        raise ValueError(f"order {list(order)} is not a permutation of the first parameters of {entry} "
                         f"({len(decls)} declared)")
    new = [decls[i] for i in order] + decls[len(order):]
    body = "\n\t" + ",\n\t".join(new) + "\n"
    return ptx[:match.start(1)] + body + ptx[match.end(1):]


def select_ptx_arch(capability: tuple[int, int]) -> int:
    """The PTX target (ptx.SUPPORTED_ARCHS) for a device of compute capability (major, minor).

    Hopper (9.0) gets sm_90a PTX (wgmma), which loads on 9.0 only; every other device from Ampere
    on gets sm_80 PTX, which the driver compiles forward for newer GPUs.
    """
    major, minor = capability
    if (major, minor) == (9, 0):
        return 90
    if major >= 8:
        return 80
    raise ValueError(f"compute capability {major}.{minor} is below 8.0; the kernels need Ampere or newer")


@dataclass(frozen=True)
class AotKernel:
    """PTX of one plugin specialisation in TensorRT's argument order, and its launch resources."""

    name: str
    ptx: str
    arch: int
    num_warps: int
    num_stages: int
    shared: int


@functools.lru_cache(maxsize=None)
def _compile_cached(config: LaunchConfig, arch: int) -> AotKernel:
    from . import ptx as ptx_mod

    compiled = None
    for stages in range(config.num_stages, 0, -1):
        compiled = ptx_mod.compile_kernel(config.kernel, arch, num_warps=config.num_warps, num_stages=stages,
                                          **config.constexpr_dict)
        if compiled.shared <= MAX_STATIC_SHARED_BYTES:
            break
    if compiled.shared > MAX_STATIC_SHARED_BYTES:
        raise ValueError(f"{config.kernel} needs {compiled.shared} bytes of shared memory even with 1 stage "
                         f"(limit {MAX_STATIC_SHARED_BYTES}); use smaller tiles")
    if compiled.global_scratch_size or compiled.profile_scratch_size:
        raise ValueError(f"{config.kernel} uses Triton scratch memory ({compiled.global_scratch_size} global, "
                         f"{compiled.profile_scratch_size} profile bytes); TensorRT passes null scratch pointers")
    order = trt_argument_order(config, compiled.params)
    return AotKernel(name=compiled.name, ptx=reorder_ptx_params(compiled.ptx, compiled.name, order), arch=arch,
                     num_warps=compiled.num_warps, num_stages=stages, shared=compiled.shared)


def compile_aot_kernel(config: LaunchConfig, arch: int) -> AotKernel:
    """PTX for ``config`` on cuda:``arch`` in TensorRT's argument order (cached: layers share shapes)."""
    return _compile_cached(config, arch)


# =========================================================================== TensorRT registration
#
# Everything below needs `tensorrt` (>= 10.9). API as documented in the TensorRT Python API reference,
# pages "tensorrt.plugin.register", "tensorrt.plugin.impl", "tensorrt.plugin.aot_impl",
# "KernelLaunchParams", "SymIntExprs", and the sample samples/python/quickly_deployable_plugins.
# TensorRT inspects the decorated functions' signatures: names must be (inputs..., attributes...,
# outputs, stream) for impl and (inputs..., attributes..., outputs, tactic) for aot_impl, and the
# annotations must be real classes. This module therefore has no `from __future__ import annotations`.

_REGISTERED = False


def plugins_registered() -> bool:
    return _REGISTERED


def register_plugins() -> None:
    """Register both plugins with TensorRT (idempotent). Raises ImportError without tensorrt."""
    global _REGISTERED
    if _REGISTERED:
        return
    import tensorrt as trt
    import tensorrt.plugin as trtp

    _register_lowrank(trt, trtp)
    _register_block_rank1(trt, trtp)
    _REGISTERED = True


def _output_desc(trt, trtp, x, out_features: int):
    dims = output_dims([x.shape_expr[i] for i in range(x.ndim)], out_features)
    return trtp.from_shape_expr(tuple(dims), dtype=trt.float32)


def _register_lowrank(trt, trtp) -> None:
    plugin_id = PLUGIN_IDS["LowRankBranch"]

    @trtp.register(plugin_id)
    def lowrank_desc(x: trtp.TensorDesc, down: trtp.TensorDesc, up: trtp.TensorDesc, rank: int,
                     in_features: int, out_features: int) -> trtp.TensorDesc:
        return _output_desc(trt, trtp, x, out_features)

    @trtp.impl(plugin_id)
    def lowrank_impl(x: trtp.Tensor, down: trtp.Tensor, up: trtp.Tensor, rank: int, in_features: int,
                     out_features: int, outputs: Tuple[trtp.Tensor], stream: int) -> None:
        _run_jit("LowRankBranch", (x, down, up), outputs[0], stream)

    @trtp.aot_impl(plugin_id)
    def lowrank_aot_impl(x: trtp.TensorDesc, down: trtp.TensorDesc, up: trtp.TensorDesc, rank: int,
                         in_features: int, out_features: int, outputs: Tuple[trtp.TensorDesc], tactic: int
                         ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        return _aot_launch(trtp, lowrank_launch_config(rank, in_features, out_features), x)


def _register_block_rank1(trt, trtp) -> None:
    plugin_id = PLUGIN_IDS["BlockRank1Branch"]

    @trtp.register(plugin_id)
    def block_rank1_desc(x: trtp.TensorDesc, sigma: trtp.TensorDesc, u: trtp.TensorDesc, v: trtp.TensorDesc,
                         block_out: int, block_in: int, in_features: int, out_features: int) -> trtp.TensorDesc:
        return _output_desc(trt, trtp, x, out_features)

    @trtp.impl(plugin_id)
    def block_rank1_impl(x: trtp.Tensor, sigma: trtp.Tensor, u: trtp.Tensor, v: trtp.Tensor, block_out: int,
                         block_in: int, in_features: int, out_features: int, outputs: Tuple[trtp.Tensor],
                         stream: int) -> None:
        _run_jit("BlockRank1Branch", (x, sigma, u, v), outputs[0], stream)

    @trtp.aot_impl(plugin_id)
    def block_rank1_aot_impl(x: trtp.TensorDesc, sigma: trtp.TensorDesc, u: trtp.TensorDesc, v: trtp.TensorDesc,
                             block_out: int, block_in: int, in_features: int, out_features: int,
                             outputs: Tuple[trtp.TensorDesc], tactic: int
                             ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        config = block_rank1_launch_config(block_out, block_in, in_features, out_features)
        return _aot_launch(trtp, config, x)


def _rows(x) -> Any:
    """M = product of x's leading dims, a TensorRT shape expression (1 for a 1-D x)."""
    if x.ndim == 1:
        return 1
    dims = x.shape_expr
    m = dims[0]
    for i in range(1, x.ndim - 1):
        m = m * dims[i]
    return m


def _current_arch() -> int:
    import torch

    return select_ptx_arch(torch.cuda.get_device_capability())


def _aot_launch(trtp, config: LaunchConfig, x) -> tuple:
    """(kernel name, PTX, KernelLaunchParams, SymIntExprs) for one plugin instance."""
    kernel = compile_aot_kernel(config, _current_arch())
    m = _rows(x)
    grid_x, grid_y = config.grid(m, cdiv=trtp.cdiv)
    launch = trtp.KernelLaunchParams()
    launch.grid_x = grid_x
    launch.grid_y = grid_y
    launch.block_x = config.threads
    launch.shared_mem = kernel.shared
    extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(v) for v in config.scalar_values(m)])
    return kernel.name.encode(), kernel.ptx.encode(), launch, extra


def _run_jit(op: str, tensors: Sequence[Any], output: Any, stream: int) -> None:
    """JIT route: the Triton kernels through torch on TensorRT's stream."""
    import torch

    from . import kernels

    K = kernels.load_kernel_module(interpret=False)
    fn = K.lowrank_branch if op == "LowRankBranch" else K.block_rank1_branch
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        args = [torch.as_tensor(t, device="cuda") for t in tensors]
        out = torch.as_tensor(output, device="cuda")
        out.copy_(fn(*args).reshape(out.shape))
