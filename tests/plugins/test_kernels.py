"""Triton kernels of the deployed linear layer against float64 torch references, on the CPU interpreter.

Tolerances: branch outputs and the full fused layer must satisfy
max |y - ref| <= 1e-4 * (1 + max |ref|) (float32 accumulation over K <= 6144 stays far below);
the integer path (activation codes x weight codes) must match the float64 reference element-wise
within float32 accumulation error, and bit-exactly when every scale is a power of two.
"""
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed; the Triton kernels cannot be tested")

from qdit4sr.plugins import kernels as _kernels  # noqa: E402

# The kernels run on CPU tensors only under the Triton interpreter; triton.jit picks it when a
# kernel is decorated, and the suite may already hold a compiled-mode import of the module.
K = _kernels.load_kernel_module(interpret=True)

REL_TOL = 1e-4
F32_EPS = 2.0**-23


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_close(y: torch.Tensor, ref: torch.Tensor, rel: float = REL_TOL) -> None:
    assert y.dtype == torch.float32 and y.shape == ref.shape
    err = (y.double() - ref).abs().max().item()
    bound = rel * (1.0 + ref.abs().max().item())
    assert err <= bound, f"max abs error {err:.3e} exceeds {bound:.3e}"


def lowrank_factors(n: int, k: int, r: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(r, k, generator=g) / k**0.5, torch.randn(n, r, generator=g) / r**0.5


def block_factors(n: int, k: int, s_o: int, s_i: int, g: torch.Generator):
    p, q = n // s_o, k // s_i
    return (torch.rand(p, q, generator=g) + 0.5, torch.randn(p, q, s_o, generator=g) / s_o**0.5,
            torch.randn(p, q, s_i, generator=g) / s_i**0.5)


def quant_weight(n: int, k: int, w_bits: int, group: int | None, g: torch.Generator):
    """(packed weight, float32 scales) with random codes over the full restricted range."""
    q = 2 ** (w_bits - 1) - 1
    codes = torch.randint(-q, q + 1, (n, k), generator=g)
    scales = (torch.rand(n, k // (group or k), generator=g) + 0.5) * 0.02
    return K.pack_weight(codes, w_bits), scales


# --------------------------------------------------------------------------- low-rank branch


@pytest.mark.parametrize("m,k,n,r", [(1, 64, 64, 8), (5, 128, 96, 32), (16, 192, 64, 32), (5, 192, 96, 8),
                                     (16, 64, 96, 8), (1, 128, 64, 32)])
def test_lowrank_matches_reference(m, k, n, r):
    g = gen(m * 1000 + k + n + r)
    x = torch.randn(m, k, generator=g)
    down, up = lowrank_factors(n, k, r, g)
    assert_close(K.lowrank_branch(x, down, up), K.lowrank_reference(x, down, up))


@pytest.mark.parametrize("k", [1536, 6144])
def test_lowrank_dit4sr_widths(k):
    g = gen(k)
    x = torch.randn(4, k, generator=g)
    down, up = lowrank_factors(64, k, 32, g)
    assert_close(K.lowrank_branch(x, down, up), K.lowrank_reference(x, down, up))


def test_lowrank_keeps_leading_dims():
    g = gen(1)
    x = torch.randn(2, 3, 64, generator=g)
    down, up = lowrank_factors(96, 64, 8, g)
    y = K.lowrank_branch(x, down, up)
    assert y.shape == (2, 3, 96)
    assert_close(y, K.lowrank_reference(x, down, up))


# --------------------------------------------------------------------------- block rank-1 branch


@pytest.mark.parametrize("m,k,n,s_o,s_i", [
    (1, 64, 64, 16, 16), (5, 128, 96, 16, 16), (16, 192, 96, 32, 64), (5, 128, 64, 32, 64),
    # Blocks that straddle the 64-wide tiles, and blocks larger than a tile.
    (5, 192, 96, 24, 48), (5, 256, 128, 128, 128), (5, 128, 128, 8, 8),
])
def test_block_rank1_matches_reference(m, k, n, s_o, s_i):
    g = gen(m * 1000 + k + n + s_o + s_i)
    x = torch.randn(m, k, generator=g)
    sigma, u, v = block_factors(n, k, s_o, s_i, g)
    assert_close(K.block_rank1_branch(x, sigma, u, v), K.block_rank1_reference(x, sigma, u, v))


def test_block_branch_tiling_counts_straddled_blocks():
    assert K.block_branch_constexprs(128, 64, 16, 64, block_n=64, block_k=64) == {"BLOCKS_K": 1, "BLOCK_T": 16}
    # 48-wide block columns straddle 64-wide k tiles (2 per tile); 24-high rows give 3 per n tile.
    assert K.block_branch_constexprs(96, 192, 24, 48, block_n=64, block_k=64) == {"BLOCKS_K": 2, "BLOCK_T": 16}
    assert K.block_branch_constexprs(128, 128, 8, 8, block_n=64, block_k=64) == {"BLOCKS_K": 8, "BLOCK_T": 64}


@pytest.mark.parametrize("k,s_o,s_i", [(1536, 16, 16), (6144, 32, 64)])
def test_block_rank1_dit4sr_widths(k, s_o, s_i):
    g = gen(k + s_i)
    x = torch.randn(4, k, generator=g)
    # Two or four output block rows of the real factor shapes keep the interpreter fast.
    sigma, u, v = block_factors(64, k, s_o, s_i, g)
    assert_close(K.block_rank1_branch(x, sigma, u, v), K.block_rank1_reference(x, sigma, u, v))


# --------------------------------------------------------------------------- fused quantized linear


def fused_case(m: int, k: int, n: int, w_bits: int, group: int | None, a_bits: int, seed: int, *,
               branches: bool = True, rank: int = 32, blocks: tuple[int, int] = (32, 64)) -> tuple[tuple, dict]:
    """Positional and keyword arguments of fused_quant_linear for a random layer."""
    g = gen(seed)
    x = torch.randn(m, k, generator=g)
    x[0, :3] = torch.tensor([40.0, -40.0, 0.0])  # clamped codes are exercised too
    packed, scales = quant_weight(n, k, w_bits, group, g)
    a_scale = 3.0 / (2 ** (a_bits - 1) - 1)
    kwargs = {}
    if branches:
        down, up = lowrank_factors(n, k, rank, g)
        sigma, u, v = block_factors(n, k, *blocks, g)
        kwargs = dict(bias=torch.randn(n, generator=g), down=down, up=up, sigma=sigma, u=u, v=v)
    return (x, packed, scales, w_bits, group, a_scale, a_bits), kwargs


@pytest.mark.parametrize("w_bits", [4, 8])
@pytest.mark.parametrize("group", [64, None])
@pytest.mark.parametrize("a_bits", [4, 6, 8])
def test_fused_matches_reference(w_bits, group, a_bits):
    args, kwargs = fused_case(5, 192, 96, w_bits, group, a_bits, seed=w_bits * 100 + a_bits + (group or 0))
    assert_close(K.fused_quant_linear(*args, **kwargs), K.fused_quant_linear_reference(*args, **kwargs))


@pytest.mark.parametrize("m,k,n,rank,blocks", [(1, 64, 64, 8, (16, 16)), (16, 128, 96, 32, (16, 16)),
                                               (16, 192, 64, 8, (32, 64))])
def test_fused_shapes_match_reference(m, k, n, rank, blocks):
    args, kwargs = fused_case(m, k, n, 4, 64, 4, seed=m + k + n, rank=rank, blocks=blocks)
    assert_close(K.fused_quant_linear(*args, **kwargs), K.fused_quant_linear_reference(*args, **kwargs))


@pytest.mark.parametrize("k,group,w_bits", [(1536, 64, 4), (6144, None, 4), (6144, 64, 8)])
def test_fused_dit4sr_widths(k, group, w_bits):
    args, kwargs = fused_case(4, k, 64, w_bits, group, 4, seed=k + w_bits)
    assert_close(K.fused_quant_linear(*args, **kwargs), K.fused_quant_linear_reference(*args, **kwargs))


def test_fused_partial_branches():
    args, kwargs = fused_case(5, 128, 64, 8, 64, 6, seed=3)
    for keep in (("down", "up"), ("sigma", "u", "v"), ("bias",)):
        subset = {name: kwargs[name] for name in keep}
        assert_close(K.fused_quant_linear(*args, **subset), K.fused_quant_linear_reference(*args, **subset))


@pytest.mark.parametrize("w_bits,group", [(4, 64), (8, None), (4, 128)])
def test_fused_integer_path_within_float32_accumulation(w_bits, group):
    """Without branches, only the float32 sum over groups may differ from the float64 reference."""
    args, _ = fused_case(16, 256, 96, w_bits, group, 8, seed=11, branches=False)
    x, packed, scales, _, _, a_scale, a_bits = args
    y = K.fused_quant_linear(*args)
    ref = K.fused_quant_linear_reference(*args)
    a_codes = K.quantize_activation_reference(x, a_scale, a_bits).double().abs()
    w_abs = K.unpack_weight(packed, w_bits, 256).double().abs() * scales.double().repeat_interleave(group or 256, 1)
    n_groups = scales.shape[1]
    bound = (n_groups + 3) * F32_EPS * (a_codes * a_scale) @ w_abs.T
    assert ((y.double() - ref).abs() <= bound).all()


@pytest.mark.parametrize("w_bits", [4, 8])
def test_fused_integer_path_exact_with_power_of_two_scales(w_bits):
    """Power-of-two scales make every product and partial sum representable: the result is exact."""
    args, _ = fused_case(16, 192, 64, w_bits, 64, 8, seed=5, branches=False)
    x, packed, _, _, group, _, a_bits = args
    scales = 2.0 ** -torch.randint(4, 9, (64, 3), generator=gen(6)).float()
    exact = (x, packed, scales, w_bits, group, 0.125, a_bits)
    assert torch.equal(K.fused_quant_linear(*exact).double(), K.fused_quant_linear_reference(*exact))


def identity_layer(w_bits: int, k: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight codes = identity, scales = 1: the layer returns Qa(x) itself."""
    return K.pack_weight(torch.eye(k, dtype=torch.int64), w_bits), torch.ones(k, 1)


@pytest.mark.parametrize("w_bits", [4, 8])
def test_activation_rounding_is_half_to_even(w_bits):
    packed, scales = identity_layer(w_bits)
    halves = torch.arange(-32, 32, dtype=torch.float32) + 0.5  # x / a_scale lands exactly on .5
    x = (halves * 0.25).reshape(1, 64)
    y = K.fused_quant_linear(x, packed, scales, w_bits, 64, 0.25, 8)
    expected = torch.clamp(torch.round(halves), -127, 127) * 0.25
    assert torch.equal(y.reshape(-1), expected)
    # Spot values: half to even, not half away from zero.
    codes = dict(zip(halves.tolist(), (y.reshape(-1) / 0.25).tolist()))
    assert codes[0.5] == 0 and codes[1.5] == 2 and codes[2.5] == 2 and codes[-0.5] == 0 and codes[-2.5] == -2


def near_ties(a_scale: float, ulps: int = 4) -> torch.Tensor:
    """float32 values within a few ulps of (k + 0.5) * a_scale, k in [-32, 32): x / a_scale is almost a tie,
    so an approximate division or a multiply by the reciprocal rounds some of them the other way."""
    base = (torch.arange(-32, 32).float() + 0.5) * torch.tensor(a_scale, dtype=torch.float32)
    rows, up, down = [base], base, base
    for _ in range(ulps):
        up, down = torch.nextafter(up, up + 1.0), torch.nextafter(down, down - 1.0)
        rows += [up, down]
    return torch.stack(rows)


@pytest.mark.parametrize("a_bits", [4, 6, 8])
def test_activation_quantization_matches_torch_bitwise(a_bits):
    """Non-power-of-two scale: the kernel's float32 division and rounding equal torch's, bit for bit."""
    packed, scales = identity_layer(8)
    g = gen(a_bits)
    a_scale = 0.1
    x = torch.cat([near_ties(a_scale), torch.randn(2, 64, generator=g) * 2.0, torch.randn(2, 64, generator=g) * 20.0])
    y = K.fused_quant_linear(x, packed, scales, 8, 64, a_scale, a_bits)
    a32 = torch.tensor(a_scale, dtype=torch.float32)
    expected = K.quantize_activation_reference(x, a_scale, a_bits) * a32
    assert torch.equal(y, expected)


def test_fused_keeps_leading_dims():
    args, kwargs = fused_case(6, 64, 64, 4, 64, 4, seed=9, blocks=(16, 16))
    x = args[0].reshape(2, 3, 64)
    y = K.fused_quant_linear(x, *args[1:], **kwargs)
    assert y.shape == (2, 3, 64)
    assert torch.equal(y.reshape(6, 64), K.fused_quant_linear(*args, **kwargs))


# --------------------------------------------------------------------------- packing and argument checks


def test_pack_weight_layout_and_roundtrip():
    codes = torch.tensor([[1, -2, 7, -7], [0, -1, 3, 5]])
    packed = K.pack_weight(codes, 4)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 2)
    assert packed[0, 0].item() == 0xE1  # even column (1) in the low nibble, -2 = 0xE in the high one
    assert torch.equal(K.unpack_weight(packed, 4, 4), codes.to(torch.int8))
    assert torch.equal(K.unpack_weight(K.pack_weight(codes, 8), 8, 4), codes.to(torch.int8))


def _bad_fused_calls():
    args, kwargs = fused_case(2, 128, 64, 4, 64, 4, seed=0, blocks=(16, 16))
    x, packed, scales, w_bits, group, a_scale, a_bits = args

    def call(*, replace=(), **overrides):
        a = list(args)
        for i, value in replace:
            a[i] = value
        return lambda: K.fused_quant_linear(*a, **{**kwargs, **overrides})

    return {
        "x float64": call(replace=[(0, x.double())]),
        "packed int8 for 4 bits": call(replace=[(1, packed.view(torch.int8))]),
        "packed wrong width": call(replace=[(1, packed[:, :32])]),
        "8-bit weight not int8": call(replace=[(1, torch.zeros(64, 128, dtype=torch.uint8)), (3, 8)]),
        "w_bits 3": call(replace=[(3, 3)]),
        "scales wrong shape": call(replace=[(2, scales[:, :1])]),
        "group not dividing K": call(replace=[(4, 96)]),
        "group not a multiple of 32": call(replace=[(1, K.pack_weight(torch.zeros(64, 48, dtype=torch.int64), 4)),
                                                    (0, x[:, :48]), (2, torch.ones(64, 3)), (4, 16)],
                                           down=None, up=None, sigma=None, u=None, v=None),
        "a_bits 1": call(replace=[(6, 1)]),
        "a_bits 9": call(replace=[(6, 9)]),
        "a_scale 0": call(replace=[(5, 0.0)]),
        "down without up": call(up=None),
        "down wrong K": call(down=kwargs["down"][:, :64]),
        "up wrong N": call(up=kwargs["up"][:32]),
        "sigma without u": call(u=None),
        "blocks not covering K": call(v=kwargs["v"][:, :4], sigma=kwargs["sigma"][:, :4], u=kwargs["u"][:, :4]),
        "bias wrong shape": call(bias=torch.zeros(63)),
        "bad precision": call(precision="fp16"),
        "block_n not a power of two": call(block_n=48),
    }


@pytest.mark.parametrize("name", list(_bad_fused_calls()))
def test_fused_rejects_bad_arguments(name):
    with pytest.raises(ValueError):
        _bad_fused_calls()[name]()


def test_branches_reject_bad_shapes():
    g = gen(0)
    x = torch.randn(3, 64, generator=g)
    down, up = lowrank_factors(32, 64, 8, g)
    sigma, u, v = block_factors(32, 64, 16, 16, g)
    bad = [
        lambda: K.lowrank_branch(x, down[:, :32], up),
        lambda: K.lowrank_branch(x, down, up[:, :4]),
        lambda: K.lowrank_branch(x.half(), down, up),
        lambda: K.lowrank_branch(x, down, up, block_k=8),
        lambda: K.block_rank1_branch(x, sigma, u, v[:, :, :8]),
        lambda: K.block_rank1_branch(x, sigma[:1], u, v),
        lambda: K.block_rank1_branch(x[:, :48], sigma, u, v),
    ]
    for call in bad:
        with pytest.raises(ValueError):
            call()


def test_cpu_tensors_need_the_interpreter():
    compiled = _kernels.load_kernel_module(interpret=False)
    x = torch.randn(2, 64)
    down, up = lowrank_factors(32, 64, 8, gen(0))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        compiled.lowrank_branch(x, down, up)
