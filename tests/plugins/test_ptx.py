"""Ahead-of-time PTX of the Triton kernels for sm_80 and sm_90, built without a GPU.

The compile runs in a subprocess without TRITON_INTERPRET, since the interpreter flag changes how
Triton builds kernels; when ``ptxas`` is on PATH it must also assemble the PTX.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed; PTX cannot be compiled")

REPO = Path(__file__).resolve().parents[2]
ARCHS = (80, 90)
FUSED_ALL = dict(W_BITS=4, A_BITS=4, HAS_BIAS=True, HAS_LOWRANK=True, HAS_BLOCK=True)
CASES = {
    "lowrank_branch": {},
    "block_rank1_branch": {},
    "fused_quant_linear": FUSED_ALL,
    "fused_quant_linear_w8_plain": dict(W_BITS=8, A_BITS=8, HAS_BIAS=False, HAS_LOWRANK=False, HAS_BLOCK=False),
}

_COMPILE_SCRIPT = """
import json, sys
from qdit4sr.plugins.ptx import compile_kernel
cases, archs, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
summary = {}
for case, constexprs in cases.items():
    kernel = case.split("_w8")[0]
    for arch in archs:
        compiled = compile_kernel(kernel, arch, **constexprs)
        path = f"{out}/{case}_sm{arch}.ptx"
        open(path, "w").write(compiled.ptx)
        summary[f"{case}:{arch}"] = {"path": path, "name": compiled.name, "shared": compiled.shared}
print(json.dumps(summary))
"""


def _nvidia_backend_available() -> bool:
    from triton.backends import backends

    return "nvidia" in backends


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    """Every case compiled for every arch in one fresh process (one Triton import, one cache)."""
    if not _nvidia_backend_available():
        pytest.skip("triton has no NVIDIA backend on this machine; PTX cannot be compiled")
    out = tmp_path_factory.mktemp("ptx")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["TRITON_CACHE_DIR"] = str(out / "cache")  # a real compile, not a cache hit
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(CASES), json.dumps(ARCHS), str(out)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"PTX compilation failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ptx(compiled: dict, case: str, arch: int) -> tuple[str, dict]:
    info = compiled[f"{case}:{arch}"]
    return Path(info["path"]).read_text(), info


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("case", list(CASES))
def test_ptx_targets_arch_and_names_the_entry(compiled, case, arch):
    ptx, info = _ptx(compiled, case, arch)
    entry = case.split("_w8")[0] + "_kernel"
    assert info["name"] == entry
    assert re.search(rf"^\.target sm_{arch}a?\b", ptx, re.MULTILINE), "wrong or missing .target"
    assert re.search(rf"\.entry {entry}\(", ptx), "kernel entry point missing"


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_ptx_keeps_exact_rounding_and_int8_math(compiled, arch):
    """IEEE division and the unfolded 1.5*2**23 add/sub keep round-half-to-even; the GEMM is int8."""
    ptx, _ = _ptx(compiled, "fused_quant_linear", arch)
    assert "div.rn.f32" in ptx
    assert "0f4B400000" in ptx  # 12582912.0, the rint constant
    assert re.search(r"(mma\.sync\.aligned\.\S*\.s8\.s8|wgmma\.mma_async\.\S*\.s8\.s8)", ptx)


@pytest.mark.skipif(shutil.which("ptxas") is None, reason="ptxas is not on PATH")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("case", list(CASES))
def test_ptxas_accepts_ptx(compiled, case, arch, tmp_path):
    ptx, _ = _ptx(compiled, case, arch)
    target = re.search(r"^\.target (sm_\w+)", ptx, re.MULTILINE).group(1)  # sm_90a for Hopper wgmma
    src = tmp_path / "kernel.ptx"
    src.write_text(ptx)
    cubin = tmp_path / "kernel.cubin"
    proc = subprocess.run(["ptxas", f"-arch={target}", str(src), "-o", str(cubin)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert cubin.stat().st_size > 0


# --------------------------------------------------------------------------- signatures (no compile)


def test_signature_types_follow_the_weight_width():
    from qdit4sr.plugins.ptx import kernel_params, kernel_signature

    sig4 = kernel_signature("fused_quant_linear", W_BITS=4)
    assert sig4["w_ptr"] == "*u8" and sig4["x_ptr"] == "*fp32" and sig4["a_scale"] == "fp32"
    assert sig4["K"] == "i32" and sig4["BLOCK_M"] == "constexpr"
    assert kernel_signature("fused_quant_linear_kernel", W_BITS=8)["w_ptr"] == "*i8"
    names = [name for name, _ in kernel_params("lowrank_branch")]
    assert names == ["x_ptr", "down_ptr", "up_ptr", "y_ptr", "M", "N", "K", "R"]


def test_compile_rejects_bad_requests():
    from qdit4sr.plugins.ptx import compile_ptx

    with pytest.raises(ValueError, match="arch"):
        compile_ptx("lowrank_branch", 75)
    with pytest.raises(ValueError, match="unknown kernel"):
        compile_ptx("no_such_kernel", 90)
    with pytest.raises(ValueError, match="needs constexpr"):
        compile_ptx("fused_quant_linear", 90, W_BITS=4)
    with pytest.raises(ValueError, match="no constexpr"):
        compile_ptx("lowrank_branch", 90, NOT_A_PARAM=1)
