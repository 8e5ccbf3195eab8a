"""H-SVD: global and block rank-1 branches, budget search, decomposition, and real-weight comparison."""
import math
from dataclasses import replace

import pytest
import torch

from qdit4sr.calibration.hsvd import (
    HSVDConfig,
    budget_split_ranks,
    block_rank1,
    block_rank1_apply,
    block_rank1_weight,
    choose_block_shape,
    decompose_weight,
    equal_budget_svd_rank,
    feasible_block_shapes,
    finest_block_shapes,
    global_svd,
    one_thread,
    reconstruction_report,
    svdg_param_count,
    svdl_param_count,
    use_randomized_svd,
)
from qdit4sr.calibration.quantizer import WeightQuantConfig, fake_quantize_weight, quantize_weight

TOL64 = 1e-10
QUANT = WeightQuantConfig(bits=4, group_size=64)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These matrices are small; a single thread avoids OpenMP oversubscription on shared cores.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _decaying(out, in_, decay, seed=0):
    """Matrix with singular values (1 + i)^-decay and random singular vectors."""
    k = min(out, in_)
    u = torch.linalg.qr(_randn(out, k, seed=seed))[0]
    v = torch.linalg.qr(_randn(in_, k, seed=seed + 1))[0]
    s = (1.0 + torch.arange(k, dtype=torch.float64)) ** -decay
    return (u * s) @ v.T


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "gptq"},
        {"rank": -1},
        {"rank": 2.0},
        {"method": "svd", "rank": 0},
        {"method": "hsvd", "rank": 0},
        {"block_candidates": ()},
        {"block_candidates": ((8, 0),)},
        {"block_candidates": [(8, 8)]},
        {"budget_slack": 0.0},
        {"budget_slack": float("inf")},
        {"randomized_svd": "auto"},
        {"seed": 1.5},
        {"split_points": -1},
    ],
)
def test_config_rejects_invalid(kwargs):
    with pytest.raises(ValueError):
        HSVDConfig(**kwargs)


def test_config_defaults():
    cfg = HSVDConfig()
    assert (cfg.method, cfg.rank, cfg.budget_slack, cfg.randomized_svd) == ("hsvd", 32, 1.0, None)
    assert (8, 8) in cfg.block_candidates and (256, 256) in cfg.block_candidates
    assert (16, 64) in cfg.block_candidates and (64, 16) in cfg.block_candidates
    assert HSVDConfig(method="rtn", rank=0).rank == 0


# --------------------------------------------------------------------------- global branch


def test_global_svd_exact_is_eckart_young():
    w = _decaying(96, 80, 0.7)
    up, down = global_svd(w, 12, randomized=False)
    assert up.shape == (96, 12) and down.shape == (12, 80)
    assert up.dtype == down.dtype == torch.float32
    s = torch.linalg.svdvals(w)
    err = (w - up.double() @ down.double()).norm()
    # Optimal truncation error sqrt(sum of the dropped sigma^2); float32 factors cost ~1e-7.
    assert err.item() == pytest.approx(s[12:].norm().item(), rel=1e-5)
    assert torch.allclose(down.double() @ down.double().T, torch.eye(12, dtype=torch.float64), atol=1e-6)


def test_global_svd_rank_bounds():
    w = _randn(10, 6)
    up, down = global_svd(w, 0)
    assert up.shape == (10, 0) and down.shape == (0, 6)
    with pytest.raises(ValueError):
        global_svd(w, 7)


@pytest.mark.parametrize("decay", [1.0, 0.5])
def test_randomized_svd_close_to_exact(decay):
    w = _decaying(800, 600, decay)
    up_r, down_r = global_svd(w, 32, randomized=True, seed=0)
    up_e, down_e = global_svd(w, 32, randomized=False)
    err_r = (w - up_r.double() @ down_r.double()).norm().item()
    err_e = (w - up_e.double() @ down_e.double()).norm().item()
    assert err_e <= err_r <= 1.01 * err_e


def test_randomized_svd_deterministic_and_leaves_global_rng():
    w = _decaying(300, 200, 1.0)
    state = torch.get_rng_state()
    a = global_svd(w, 8, randomized=True, seed=3)
    b = global_svd(w, 8, randomized=True, seed=3)
    c = global_svd(w, 8, randomized=True, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_randomized_auto_rule():
    assert use_randomized_svd((2048, 1536), 32)
    assert not use_randomized_svd((384, 384), 16)
    assert not use_randomized_svd((1536, 384), 32)  # small side below 1024
    assert not use_randomized_svd((2048, 1536), 512)  # rank not small against the matrix


# --------------------------------------------------------------------------- block branch


@pytest.mark.parametrize("shape,block", [((48, 96), (8, 16)), ((64, 64), (16, 16)), ((32, 96), (32, 8))])
def test_block_rank1_recovers_exact_block_rank1_matrix(shape, block):
    (out, in_), (s_o, s_i) = shape, block
    p, q = out // s_o, in_ // s_i
    sigma = _randn(p, q, seed=1).abs() + 0.5
    u = torch.nn.functional.normalize(_randn(p, q, s_o, seed=2), dim=-1)
    v = torch.nn.functional.normalize(_randn(p, q, s_i, seed=3), dim=-1)
    w = block_rank1_weight(sigma, u, v)
    assert w.shape == shape
    rec = block_rank1_weight(*block_rank1(w, s_o, s_i))
    assert (rec - w).abs().max().item() < TOL64
    assert torch.allclose(block_rank1(w, s_o, s_i)[0], sigma, atol=TOL64)


def test_block_rank1_equals_per_block_top_singular_triple():
    r = _randn(64, 96, seed=5)
    s_o, s_i = 16, 32
    sigma, u, v = block_rank1(r, s_o, s_i)
    assert sigma.shape == (4, 3) and u.shape == (4, 3, 16) and v.shape == (4, 3, 32)
    for p in range(4):
        for q in range(3):
            block = r[p * s_o : (p + 1) * s_o, q * s_i : (q + 1) * s_i]
            bu, bs, bvh = torch.linalg.svd(block)
            assert sigma[p, q].item() == pytest.approx(bs[0].item(), abs=TOL64)
            # The outer product is sign-invariant, unlike u and v themselves.
            ref = bs[0] * torch.outer(bu[:, 0], bvh[0])
            got = sigma[p, q] * torch.outer(u[p, q], v[p, q])
            assert (got - ref).abs().max().item() < TOL64


def test_one_thread_runs_torch_on_one_thread_and_always_restores():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="boom"), one_thread():
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
        # The decomposition's LAPACK calls run inside it; the caller's setting is left as it was.
        block_rank1(_randn(64, 96, seed=5), 16, 32)
        global_svd(_randn(1024, 1024, seed=6), 8, randomized=True)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_block_rank1_rejects_non_dividing_shape():
    with pytest.raises(ValueError):
        block_rank1(_randn(48, 96), 10, 16)


def test_block_rank1_apply_matches_dense():
    sigma, u, v = block_rank1(_randn(48, 96, seed=7), 16, 8)
    x = _randn(3, 5, 96, seed=8)
    ref = x @ block_rank1_weight(sigma, u, v).T
    got = block_rank1_apply(x, sigma, u, v)
    assert got.shape == (3, 5, 48)
    assert (got - ref).abs().max().item() < TOL64


# --------------------------------------------------------------------------- budget


def test_param_counts_by_hand():
    assert svdg_param_count(1536, 1536, 32) == 32 * 3072 == 98304
    # 24 x 24 blocks of 64 x 64, each sigma + 64 + 64 values.
    assert svdl_param_count(1536, 1536, 64, 64) == 576 * 129 == 74304
    # 48 x 12 blocks of 32 x 128.
    assert svdl_param_count(1536, 1536, 32, 128) == 576 * 161 == 92736
    assert svdl_param_count(1536, 384, 64, 32) == 24 * 12 * 97 == 27936
    with pytest.raises(ValueError):
        svdl_param_count(1536, 1536, 48, 100)


def test_feasible_block_shapes_by_hand():
    # Budget 16 * (384 + 384) = 12288: (32, 32) needs 144 * 65 = 9360, (16, 32) needs 288 * 49 = 14112.
    cands = ((16, 32), (32, 32), (7, 8), (256, 256), (64, 64))
    assert feasible_block_shapes(384, 384, 16, cands, 1.0) == [(32, 32), (64, 64)]
    assert feasible_block_shapes(384, 384, 16, cands, 1.2) == [(16, 32), (32, 32), (64, 64)]


def _brute_force_choice(r, rank, candidates, slack):
    out, in_ = r.shape
    best, best_err = None, float("inf")
    for s_o, s_i in candidates:
        if out % s_o or in_ % s_i:
            continue
        blocks = (out // s_o) * (in_ // s_i)
        if blocks * (s_o + s_i + 1) > slack * rank * (out + in_):
            continue
        err = (r - block_rank1_weight(*block_rank1(r, s_o, s_i))).norm().item()
        if err < best_err:
            best, best_err = (s_o, s_i), err
    return best, best_err


@pytest.mark.parametrize("rank,slack", [(4, 1.0), (8, 0.5), (2, 3.0), (16, 1.0)])
def test_choose_block_shape_is_feasible_and_minimal(rank, slack):
    out, in_ = 96, 128
    # Low-rank head-like structure in a few row blocks plus noise, so the candidates differ clearly.
    r = 0.3 * _randn(out, in_, seed=11)
    r[:32] += _randn(32, 2, seed=12) @ _randn(2, in_, seed=13)
    cands = ((8, 8), (8, 16), (16, 8), (16, 16), (32, 16), (16, 32), (32, 32), (24, 32), (7, 8), (64, 64), (96, 128))
    chosen = choose_block_shape(r, rank, cands, slack)
    expected, expected_err = _brute_force_choice(r, rank, cands, slack)
    assert chosen == expected
    s_o, s_i = chosen
    assert out % s_o == 0 and in_ % s_i == 0
    assert svdl_param_count(out, in_, s_o, s_i) <= slack * svdg_param_count(out, in_, rank)
    err = (r - block_rank1_weight(*block_rank1(r, s_o, s_i))).norm().item()
    assert err == pytest.approx(expected_err, rel=1e-12)


def test_finest_block_shapes_by_hand():
    shapes = [(32, 32), (16, 32), (32, 64), (64, 16), (24, 32), (8, 128)]
    # (32, 32) and (32, 64) refine to (16, 32); (24, 32) and (64, 16) and (8, 128) have no refinement listed
    assert finest_block_shapes(shapes) == [(16, 32), (64, 16), (24, 32), (8, 128)]
    assert finest_block_shapes([]) == []


@pytest.mark.parametrize("seed", range(4))
def test_a_refined_tiling_never_fits_worse(seed):
    """The pruning's premise, by brute force: every coarse shape's error >= that of any shape refining it."""
    r = _randn(64, 64, seed=seed) + _randn(64, 3, seed=seed + 10) @ _randn(3, 64, seed=seed + 20)
    sides = (4, 8, 16, 32)
    err = {(a, b): (r - block_rank1_weight(*block_rank1(r, a, b))).norm().item() for a in sides for b in sides}
    for (a, b), e in err.items():
        for (c, d), f in err.items():
            if a % c == 0 and b % d == 0:
                assert f <= e * (1 + 1e-12), ((c, d), (a, b))


def test_top_singular_value_from_the_gram_matrix():
    from qdit4sr.calibration.hsvd import _top_singular_value_sq

    blocks = _randn(5 * 3 * 8, 16, seed=4).reshape(5, 3, 8, 16).double()
    for b in (blocks, blocks.transpose(-1, -2)):
        ref = torch.linalg.svdvals(b)[..., 0] ** 2
        assert torch.allclose(_top_singular_value_sq(b), ref, rtol=1e-10)


def test_choose_block_shape_none_when_nothing_fits():
    r = _randn(96, 128)
    assert choose_block_shape(r, 1, ((8, 8), (7, 8)), 0.1) is None


def test_equal_budget_svd_rank_by_hand():
    cfg = HSVDConfig(rank=16)
    # (12288 + 9360) // 768 = 28.
    assert equal_budget_svd_rank(384, 384, cfg, (32, 32)) == 28
    # (16 * 1920 + 27936) // 1920 = 30.
    assert equal_budget_svd_rank(1536, 384, cfg, (64, 32)) == 30
    assert equal_budget_svd_rank(384, 384, cfg, None) == 16


# --------------------------------------------------------------------------- decomposition


@pytest.fixture(scope="module")
def rotated_weight():
    # Decaying spectrum plus noise, float32 like a checkpoint.
    return (_decaying(128, 192, 0.8, seed=21) + 0.002 * _randn(128, 192, seed=22)).float()


@pytest.mark.parametrize("method", ["rtn", "svd", "hsvd", "hsvd_split"])
def test_branch_apply_matches_branch_weight(rotated_weight, method):
    dec = decompose_weight(rotated_weight, HSVDConfig(method=method, rank=8), QUANT)
    x = _randn(2, 7, 192, seed=23)
    got = dec.branch_apply(x)
    assert got.shape == (2, 7, 128) and got.dtype == torch.float64
    # Exact in float64 against the dense branch built from the same stored factors.
    dense = torch.zeros(128, 192, dtype=torch.float64)
    if dec.up is not None:
        dense += dec.up.double() @ dec.down.double()
    if dec.sigma is not None:
        dense += block_rank1_weight(dec.sigma.double(), dec.u.double(), dec.v.double())
    assert (got - x @ dense.T).abs().max().item() < TOL64
    # branch_weight() is that dense matrix rounded to float32.
    assert (dec.branch_weight().double() - dense).abs().max().item() < 1e-6
    got32 = dec.branch_apply(x.float())
    assert got32.dtype == torch.float32
    assert (got32.double() - x @ dec.branch_weight().double().T).abs().max().item() < 1e-5


def test_hsvd_quantizes_only_the_final_residue(rotated_weight):
    cfg = HSVDConfig(rank=8, block_candidates=((16, 16), (32, 32), (16, 64)))
    dec = decompose_weight(rotated_weight, cfg, QUANT)
    assert dec.method == "hsvd" and dec.block_shape is not None
    s_o, s_i = dec.block_shape
    assert dec.up.shape == (128, 8) and dec.sigma.shape == (128 // s_o, 192 // s_i)
    assert dec.fp_param_count() == svdg_param_count(128, 192, 8) + svdl_param_count(128, 192, s_o, s_i)
    final = rotated_weight.double() - dec.branch_weight().double()
    assert torch.equal(dec.residual.qweight, quantize_weight(final, QUANT).qweight)
    assert torch.allclose(dec.reconstruct(), dec.branch_weight() + dec.residual.dequantize())


def test_branches_reduce_error_on_structured_weight(rotated_weight):
    errs = {}
    for method in ("rtn", "svd", "hsvd"):
        dec = decompose_weight(rotated_weight, HSVDConfig(method=method, rank=8), QUANT)
        errs[method] = _rel(dec.reconstruct().double(), rotated_weight.double())
    assert errs["hsvd"] < errs["svd"] < errs["rtn"]


def test_rtn_rank0_equals_fake_quantization(rotated_weight):
    dec = decompose_weight(rotated_weight, HSVDConfig(method="rtn", rank=0), QUANT)
    assert dec.up is None and dec.sigma is None and dec.block_shape is None
    assert dec.fp_param_count() == 0
    assert torch.equal(dec.branch_weight(), torch.zeros(128, 192))
    assert torch.equal(dec.reconstruct(), fake_quantize_weight(rotated_weight, QUANT))


def test_hsvd_without_feasible_blocks_is_global_only(rotated_weight):
    cfg = HSVDConfig(rank=8, block_candidates=((8, 8),), budget_slack=0.01)
    hs = decompose_weight(rotated_weight, cfg, QUANT)
    sv = decompose_weight(rotated_weight, HSVDConfig(method="svd", rank=8), QUANT)
    assert hs.block_shape is None and hs.sigma is None
    assert torch.equal(hs.reconstruct(), sv.reconstruct())


@pytest.mark.parametrize("randomized", [False, True])
def test_decomposition_is_deterministic(rotated_weight, randomized):
    cfg = HSVDConfig(rank=8, randomized_svd=randomized, seed=5)
    a = decompose_weight(rotated_weight, cfg, QUANT)
    b = decompose_weight(rotated_weight, cfg, QUANT)
    assert a.block_shape == b.block_shape
    for name in ("up", "down", "sigma", "u", "v"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.residual.qweight, b.residual.qweight)
    assert torch.equal(a.residual.scales, b.residual.scales)


# --------------------------------------------------------------------------- real trained weights

MINILM_RANK = 16
# All pairs of 16/32/64: every shape the full default grid picks on MiniLM at rank 16, at a third of the cost.
MINILM_CANDIDATES = tuple((a, b) for a in (16, 32, 64) for b in (16, 32, 64))


@pytest.fixture(scope="module")
def minilm_report(minilm_linear_weights):
    cfg = HSVDConfig(rank=MINILM_RANK, block_candidates=MINILM_CANDIDATES)
    rows = reconstruction_report(minilm_linear_weights, MINILM_RANK, QUANT, cfg, split=False)
    return {(r.method, r.setting): r for r in rows}


def test_minilm_weights_cover_all_linear_shapes(minilm_linear_weights):
    shapes = {tuple(w.shape) for w in minilm_linear_weights.values()}
    assert shapes == {(384, 384), (1536, 384), (384, 1536)}
    assert len(minilm_linear_weights) == 6 * 6 + 1  # six per encoder layer plus the pooler


def test_minilm_hsvd_beats_same_rank_svd_and_rtn(minilm_report):
    rtn = minilm_report[("rtn", "no branch")]
    svd_r = minilm_report[("svd", f"rank {MINILM_RANK}")]
    hsvd = minilm_report[("hsvd", f"rank {MINILM_RANK} + blocks")]
    assert rtn.fp_params == 0
    assert hsvd.mean_rel_error < svd_r.mean_rel_error < rtn.mean_rel_error
    # 4-bit, group 64 on rotated weights: a few percent to ~20% relative error is the plausible range.
    assert 0.05 < rtn.mean_rel_error < 0.2
    # The budget constraint with slack 1 at most doubles the FP parameters of the global branch.
    assert svd_r.fp_params < hsvd.fp_params <= 2 * svd_r.fp_params


def test_minilm_equal_budget_svd_is_slightly_better_than_hsvd(minilm_report):
    # Measured finding, not a design goal: on these weights the FP parameters H-SVD spends on
    # blocks buy less than the same number spent on extra global singular triples
    # (about 0.0874 vs 0.0856 mean relative error at rank 16).  If H-SVD ever wins here,
    # update this test and the documentation together.
    hsvd = minilm_report[("hsvd", f"rank {MINILM_RANK} + blocks")]
    svd_eq = minilm_report[("svd", "equal FP budget")]
    assert svd_eq.fp_params <= hsvd.fp_params  # the equal-budget rank is rounded down
    assert svd_eq.mean_rel_error < hsvd.mean_rel_error < 1.05 * svd_eq.mean_rel_error



# --------------------------------------------------------------------------- budget-split H-SVD


def test_budget_split_ranks_by_hand():
    assert budget_split_ranks(8, 8, 2) == [8]
    assert budget_split_ranks(8, 20, 2) == [8, 12, 16, 20]
    assert budget_split_ranks(8, 9, 3) == [8, 9]
    assert budget_split_ranks(4, 10, 0) == [4, 10]


def _quantized_error(w, dec):
    return ((w.double() - dec.reconstruct().double()).norm() / w.double().norm()).item()


def _check_split_never_loses(w, rank, candidates=((8, 8), (16, 16), (8, 32), (32, 8), (32, 32), (16, 64)),
                             points=2):
    """hsvd_split against the paper's split and the all-global SVD of the same budget, and brute force."""
    cfg = HSVDConfig(rank=rank, block_candidates=candidates)
    paper = decompose_weight(w, cfg, QUANT)
    split = decompose_weight(w, replace(cfg, method="hsvd_split", split_points=points), QUANT)
    budget = paper.fp_param_count()
    eq_rank = equal_budget_svd_rank(*w.shape, cfg, paper.block_shape)
    all_global = decompose_weight(w, HSVDConfig(method="svd", rank=eq_rank), QUANT)
    assert split.method == "hsvd_split"
    assert split.fp_param_count() <= budget
    assert all_global.fp_param_count() <= budget
    e_split = _quantized_error(w, split)
    assert e_split <= _quantized_error(w, paper) + 1e-12
    assert e_split <= _quantized_error(w, all_global) + 1e-12
    return split, paper, all_global


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rank", [2, 8])
def test_budget_split_never_exceeds_budget_nor_loses_on_random_weights(seed, rank):
    # A flat spectrum (pure noise) and a decaying one: the two regimes where blocks or rank win.
    noise = _randn(64, 128, seed=30 + seed).float()
    structured = (_decaying(64, 128, 1.0, seed=40 + seed) + 0.01 * _randn(64, 128, seed=50 + seed)).float()
    for w in (noise, structured):
        _check_split_never_loses(w, rank)


def test_budget_split_equals_the_best_candidate_by_brute_force(rotated_weight):
    split, paper, _ = _check_split_never_loses(rotated_weight, 8, points=3)
    budget = paper.fp_param_count()
    # Brute force over every global rank and every block shape that fits the rest of the budget.
    best = math.inf
    max_rank = budget // (128 + 192)
    up_all, down_all = global_svd(rotated_weight, max_rank)
    cands = ((8, 8), (16, 16), (8, 32), (32, 8), (32, 32), (16, 64))
    ranks = budget_split_ranks(8, max_rank, 3)
    assert len(ranks) == 5
    for r in ranks:
        rest = rotated_weight.double() - up_all[:, :r].double() @ down_all[:r].double()
        left = budget - svdg_param_count(128, 192, r)
        best_r = math.inf
        for shape in [None] + [c for c in cands if svdl_param_count(128, 192, *c) <= left]:
            r2 = rest
            if shape is not None:
                sig, u, v = (t.float() for t in block_rank1(rest, *shape))
                r2 = rest - block_rank1_weight(sig.double(), u.double(), v.double())
            recon = rotated_weight.double() - r2 + quantize_weight(r2, QUANT).dequantize().double()
            best_r = min(best_r, ((rotated_weight.double() - recon).norm() / rotated_weight.double().norm()).item())
        best = min(best, best_r)
    # The split scores one (Frobenius-best) block shape per rank, so it may miss a shape that happens to
    # quantize better; it stays within 1% of the exhaustive optimum over the same ranks.
    assert best - 1e-7 <= _quantized_error(rotated_weight, split) <= 1.01 * best


@pytest.fixture(scope="module")
def minilm_three_layers(minilm_linear_weights):
    """One rotated MiniLM weight of each shape (384x384, 1536x384, 384x1536)."""
    from qdit4sr.calibration.hadamard import rotate_weight

    picked = {}
    for name, w in minilm_linear_weights.items():
        picked.setdefault(tuple(w.shape), rotate_weight(w.double()).float())
    return list(picked.values())


def test_budget_split_never_exceeds_budget_nor_loses_on_minilm(minilm_three_layers):
    for w in minilm_three_layers:
        _check_split_never_loses(w, MINILM_RANK, MINILM_CANDIDATES)
