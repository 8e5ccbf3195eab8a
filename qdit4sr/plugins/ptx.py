"""Ahead-of-time PTX for the Triton kernels of ``qdit4sr.plugins.kernels`` (no GPU needed).

A TensorRT plugin loads the PTX with the CUDA driver and launches the entry point with the
kernel's non-constexpr arguments in declaration order (``kernel_params``), followed by the two
scratch pointers every Triton kernel takes (global and profile scratch; null when the
corresponding metadata size is 0), on a grid of (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M)) programs of
``num_warps * 32`` threads with ``shared`` bytes of dynamic shared memory (above 48 KiB it must
be enabled with cuFuncSetAttribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)).

Compilation targets cuda:arch through Triton's NVIDIA backend; no driver or device is queried.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = [
    "SUPPORTED_ARCHS",
    "DEFAULT_PTX_VERSION",
    "DEFAULT_CONSTEXPRS",
    "CompiledPTX",
    "kernel_params",
    "kernel_signature",
    "compile_kernel",
    "compile_ptx",
]

SUPPORTED_ARCHS = (80, 90)

# PTX ISA 8.4 (CUDA 12.4) has every sm_90a feature the kernels use; Triton's default, the ISA of
# its newest bundled ptxas, would need an equally new driver or toolkit to load the PTX.
DEFAULT_PTX_VERSION = 84

# Tile sizes for deployment; semantic constexprs (bits, HAS_* flags) have no default.  BLOCKS_K = 1,
# BLOCK_T = 16 suit block widths s_i that are multiples of BLOCK_K and at most 16 block rows per
# n tile; other block shapes take theirs from kernels.block_branch_constexprs.
DEFAULT_CONSTEXPRS: dict[str, dict[str, Any]] = {
    "lowrank_branch": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_R": 32, "PRECISION": "tf32x3"},
    "block_rank1_branch": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "BLOCKS_K": 1, "BLOCK_T": 16,
                           "PRECISION": "tf32x3"},
    "fused_quant_linear": {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "BLOCK_R": 32, "BLOCKS_K": 1,
                           "BLOCK_T": 16, "PRECISION": "tf32x3"},
}

_SCALAR_TYPES = {"a_scale": "fp32"}  # every other non-pointer argument is an i32 size


@dataclass(frozen=True)
class CompiledPTX:
    """PTX of one kernel specialisation plus what a launcher needs to know."""

    name: str  # entry point
    ptx: str
    params: tuple[tuple[str, str], ...]  # (name, triton type) of the runtime arguments, in order
    num_warps: int
    shared: int  # dynamic shared memory in bytes
    global_scratch_size: int
    profile_scratch_size: int


def _kernels() -> ModuleType:
    """The kernels module built for compilation, whatever mode the process imported it in."""
    try:
        from . import kernels
    except ImportError as exc:
        if exc.name != "triton":
            raise
        raise RuntimeError("the Triton kernels need triton (pip install 'qdit4sr[triton]')") from exc
    return kernels.load_kernel_module(interpret=False)


def _kernel(kernel_name: str):
    """Look a kernel up by op name ("fused_quant_linear") or entry name ("fused_quant_linear_kernel")."""
    registry = _kernels().KERNELS
    op = kernel_name.removesuffix("_kernel")
    if op not in registry:
        raise ValueError(f"unknown kernel {kernel_name!r}; expected one of {sorted(registry)}")
    return op, registry[op]


def _arg_type(name: str, constexprs: dict[str, Any]) -> str:
    if name == "w_ptr":
        # 4-bit codes are packed two per byte; 8-bit codes are plain int8.
        return "*u8" if constexprs.get("W_BITS") == 4 else "*i8"
    if name.endswith("_ptr"):
        return "*fp32"
    return _SCALAR_TYPES.get(name, "i32")


def kernel_params(kernel_name: str, **constexprs: Any) -> tuple[tuple[str, str], ...]:
    """(name, triton type) of a kernel's runtime (non-constexpr) arguments, in launch order."""
    _, kernel = _kernel(kernel_name)
    return tuple((p.name, _arg_type(p.name, constexprs)) for p in kernel.params if not p.is_constexpr)


def kernel_signature(kernel_name: str, **constexprs: Any) -> dict[str, str]:
    """Triton signature of a kernel: runtime argument types, "constexpr" for the constexprs."""
    _, kernel = _kernel(kernel_name)
    runtime = dict(kernel_params(kernel_name, **constexprs))
    return {p.name: "constexpr" if p.is_constexpr else runtime[p.name] for p in kernel.params}


def _resolve_constexprs(op: str, kernel, given: dict[str, Any]) -> dict[str, Any]:
    names = [p.name for p in kernel.params if p.is_constexpr]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ValueError(f"{op} has no constexpr {unknown}; its constexprs are {names}")
    values = {**DEFAULT_CONSTEXPRS[op], **given}
    missing = [n for n in names if n not in values]
    if missing:
        raise ValueError(f"{op} needs constexpr values for {missing}")
    return {n: values[n] for n in names}


def _triton_built_for_interpreter() -> bool:
    """Whether ``triton`` was imported under TRITON_INTERPRET=1: its own helpers are then
    interpreter functions, which the compiler rejects, so compiling needs a fresh process."""
    import triton
    import triton.language as tl

    return not isinstance(tl.zeros, triton.runtime.JITFunction)


def compile_kernel(kernel_name: str, arch: int, *, num_warps: int = 4, num_stages: int = 3,
                   ptx_version: int | None = DEFAULT_PTX_VERSION, aligned: bool = True,
                   **constexprs: Any) -> CompiledPTX:
    """Compile one kernel specialisation for cuda:``arch`` without a GPU.

    ``aligned`` promises 16-byte aligned base pointers (true of torch and TensorRT allocations),
    which lets the compiler vectorise loads.  ``ptx_version`` None keeps Triton's own choice.
    In a process whose ``triton`` runs the interpreter the compile happens in a subprocess.
    """
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"arch must be one of {SUPPORTED_ARCHS}, got {arch!r}")
    op, kernel = _kernel(kernel_name)
    values = _resolve_constexprs(op, kernel, constexprs)
    options = {"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True}
    if ptx_version is not None:
        options["ptx_version"] = ptx_version
    if _triton_built_for_interpreter():
        return _compile_in_subprocess(op, arch, options, aligned, values)
    return _compile(op, kernel, arch, options, aligned, values)


def _compile(op: str, kernel, arch: int, options: dict[str, Any], aligned: bool,
             values: dict[str, Any]) -> CompiledPTX:
    import triton
    from triton.backends.compiler import GPUTarget

    signature = kernel_signature(op, **values)
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(kernel.params)
             if aligned and signature[p.name].startswith("*")}
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=values, attrs=attrs)
    # Triton also reads TRITON_INTERPRET while compiling (the kernels may come from a private copy).
    with _kernels().triton_mode(False):
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    meta = compiled.metadata
    return CompiledPTX(name=meta.name, ptx=compiled.asm["ptx"], params=kernel_params(op, **values),
                       num_warps=meta.num_warps, shared=meta.shared,
                       global_scratch_size=getattr(meta, "global_scratch_size", 0),
                       profile_scratch_size=getattr(meta, "profile_scratch_size", 0))


def _compile_in_subprocess(op: str, arch: int, options: dict[str, Any], aligned: bool,
                           values: dict[str, Any]) -> CompiledPTX:
    request = {"kernel": op, "arch": arch, "options": options, "aligned": aligned, "constexprs": values}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", __name__], input=json.dumps(request), env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"compiling {op} for sm_{arch} in a subprocess failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout)
    result["params"] = tuple(tuple(p) for p in result["params"])
    return CompiledPTX(**result)


def compile_ptx(kernel_name: str, arch: int, **constexprs: Any) -> str:
    """PTX text of ``kernel_name`` for cuda:``arch`` (80 or 90); see ``compile_kernel`` for options."""
    return compile_kernel(kernel_name, arch, **constexprs).ptx


def _main() -> None:
    """Compile one request read as JSON from stdin; print the CompiledPTX as JSON."""
    request = json.load(sys.stdin)
    op, kernel = _kernel(request["kernel"])
    compiled = _compile(op, kernel, request["arch"], request["options"], request["aligned"], request["constexprs"])
    json.dump(asdict(compiled), sys.stdout)


if __name__ == "__main__":
    _main()
