"""The baseline quantizers (training/quantizers): the shared interface, then what is particular to each.

All CPU and small (a few seconds in all); the one large case is VQ at the reference
K = 2**16 with 4096 tokens, to check that the nearest-code search stays within its memory bound.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gqtok.training.quantizers import BSQ, FSQ, LFQ, QUANTIZERS, QuantizerOutput, VectorQuantizer, build_quantizer
from gqtok.training.quantizers.vq import nearest_codes

NAMES = ["vq", "fsq", "lfq", "bsq"]
# Small enough to be fast; VQ at the reference K is tested on its own below.
SMALL = {"vq": {"num_codes": 256, "dim": 8}, "fsq": {}, "lfq": {}, "bsq": {}}


def make(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_quantizer(name, **{**SMALL[name], **kwargs})


def latent(q, b=2, h=4, w=5, seed=1, scale=1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, q.dim, h, w, generator=g) * scale


# --- the shared interface -------------------------------------------------------------------------


def test_build_quantizer_names_and_unknown():
    assert QUANTIZERS == {"vq": VectorQuantizer, "fsq": FSQ, "lfq": LFQ, "bsq": BSQ}
    for name in NAMES:
        assert type(make(name)) is QUANTIZERS[name]
    with pytest.raises(ValueError, match="bsq.*fsq.*lfq.*vq"):
        build_quantizer("rvq")


@pytest.mark.parametrize(
    "name, dim, num_codes", [("vq", 16, 2**16), ("fsq", 6, 64000), ("lfq", 16, 2**16), ("bsq", 16, 2**16)]
)
def test_reference_settings(name, dim, num_codes):
    q = build_quantizer(name)
    assert (q.dim, q.num_codes) == (dim, num_codes)
    assert q.bits_per_token == pytest.approx(math.log2(num_codes))
    assert isinstance(q.bits_per_token, float)


@pytest.mark.parametrize("name", NAMES)
def test_output_shapes_types_and_decode(name):
    q = build_quantizer(name)  # reference settings
    z = latent(q, b=2, h=3, w=5)
    out = q(z)
    assert isinstance(out, QuantizerOutput)
    assert out.z_q.shape == z.shape and out.z_q.dtype == torch.float32
    assert out.ids.shape == (2, 3, 5) and out.ids.dtype == torch.long
    assert 0 <= int(out.ids.min()) and int(out.ids.max()) < q.num_codes
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert {"usage", "perplexity"} <= set(out.stats)
    assert all(type(v) is float and math.isfinite(v) for v in out.stats.values())
    assert 0 < out.stats["usage"] <= 30 / q.num_codes
    # decode_ids gives forward's values exactly, not just closely
    assert torch.equal(q.decode_ids(out.ids), out.z_q)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic(name):
    q = make(name)
    z = latent(q, b=3, h=6, w=6)
    a, b = q(z), q(z.clone())
    assert torch.equal(a.ids, b.ids) and torch.equal(a.z_q, b.z_q) and torch.equal(a.loss, b.loss)
    assert a.stats == b.stats


@pytest.mark.parametrize("name", NAMES)
def test_float32_inside_whatever_the_input(name):
    """bf16 inputs and bf16 autocast give the same ids and float32 outputs as plain float32."""
    q = make(name)
    z = latent(q, b=2, h=8, w=8).bfloat16()
    ref = q(z.float())
    out = q(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = q(z.float())
    for o in (out, auto):
        assert o.z_q.dtype == torch.float32 and o.loss.dtype == torch.float32
        assert torch.equal(o.ids, ref.ids) and torch.equal(o.z_q, ref.z_q)


@pytest.mark.parametrize("name", NAMES)
def test_straight_through_gradient(name):
    """The reconstruction gradient passes the rounding as if it were the identity."""
    q = make(name)
    z = latent(q, b=2, h=4, w=4).requires_grad_(True)
    g = torch.randn_like(z)
    q(z).z_q.backward(g)
    if name in ("vq", "lfq"):  # z_q = z in the backward pass
        expected = g
    elif name == "fsq":  # identity on the rounding, so the tanh bound's derivative remains
        (expected,) = torch.autograd.grad(q.bound(z) / q.half_width, z, g)
    else:  # bsq: identity on u = z / |z|, so the normalisation's derivative remains
        (expected,) = torch.autograd.grad(F.normalize(z, dim=1), z, g)
    assert torch.allclose(z.grad, expected, atol=1e-6)
    assert (z.grad != 0).float().mean() > 0.99


@pytest.mark.parametrize("name", NAMES)
def test_z_continuous_is_what_gets_quantized(name):
    """z_continuous, the value before rounding or lookup on z_q's scale: quantizing it again gives z_q back (FSQ:
    rounding on the level grid; VQ: the nearest codeword; LFQ and BSQ: the sign), and it is not z_q itself."""
    q = make(name).eval()
    out = q(latent(q, b=2, h=4, w=4))
    c = out.z_continuous
    assert c.shape == out.z_q.shape and not c.requires_grad and not torch.equal(c, out.z_q)
    if name == "fsq":
        again = torch.round(c * q.half_width) / q.half_width
    elif name == "vq":
        again = q.decode_ids(q(c).ids)
    else:
        again = torch.where(c > 0, 1.0, -1.0) * q.scale
    assert torch.allclose(again, out.z_q, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_aux_loss_gradient_is_finite(name):
    q = make(name)
    z = latent(q).requires_grad_(True)
    out = q(z)
    (out.z_q.square().mean() + out.loss).backward()
    assert torch.isfinite(z.grad).all()
    for p in q.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("name", ["fsq", "lfq", "bsq"])
def test_learns_a_target_through_the_quantizer(name):
    """100 Adam steps on z, through the straight-through rounding, put almost every channel on its target
    level (squared error per token, plus the quantizer's own aux loss, as in training). Not quite all:
    a random target has tokens that share a sub-codebook entry, and the batch-entropy term of LFQ / BSQ
    pushes them apart, against the target; in BSQ a few such bits stall at u ~ 0."""
    q = make(name)
    torch.manual_seed(2)
    target_ids = torch.randint(q.num_codes, (4, 8, 8))
    target = q.decode_ids(target_ids)
    z = torch.nn.Parameter(torch.randn(target.shape))
    opt = torch.optim.Adam([z], lr=0.05)
    errors = []
    for _ in range(100):
        out = q(z)
        err = (out.z_q - target).square().sum(1).mean()
        opt.zero_grad()
        (err + out.loss).backward()
        opt.step()
        errors.append(err.item())
    assert errors[-1] < 0.05 * errors[0], errors[::10]
    assert (q(z).z_q == target).float().mean() > 0.99


def test_vq_learns_its_codebook():
    """On fixed encoder outputs, the codebook loss alone moves codewords onto the data: the quantization
    error falls well below that of the near-zero initial codebook (like a few rounds of k-means)."""
    q = make("vq", num_codes=64, dim=4)
    z = latent(q, b=4, h=8, w=8)
    opt = torch.optim.Adam(q.parameters(), lr=0.05)
    errors = []
    for _ in range(100):
        out = q(z)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        errors.append(out.stats["commit"])
    assert errors[-1] < 0.5 * errors[0], errors[::10]
    assert out.stats["usage"] > 0.25


# --- VQ ------------------------------------------------------------------------------------------


def test_vq_nearest_matches_brute_force_for_any_tiling():
    g = torch.Generator().manual_seed(0)
    codebook, tokens = torch.randn(100, 5, generator=g), torch.randn(333, 5, generator=g)
    brute = torch.cdist(tokens.double(), codebook.double()).argmin(1)
    for rows, cols in [(7, 13), (256, 4096), (333, 100), (1, 100), (333, 1), (1000, 37)]:
        assert torch.equal(nearest_codes(tokens, codebook, rows, cols), brute), (rows, cols)


def test_vq_chunked_equals_unchunked_and_ignores_batch():
    q = make("vq", num_codes=1000, dim=8, chunk_tokens=7, chunk_codes=13)
    z = latent(q, b=3, h=8, w=8)
    chunked = q(z).ids
    q.chunk_tokens, q.chunk_codes = 4096, 10**6  # one tile holds everything
    assert torch.equal(q(z).ids, chunked)
    assert torch.equal(q(z[1:2]).ids, chunked[1:2])  # a token's id does not depend on its batch


def test_vq_ties_go_to_lowest_index():
    q = make("vq", num_codes=300, dim=2, chunk_tokens=4, chunk_codes=64)
    with torch.no_grad():
        q.codebook.zero_()
        q.codebook[[5, 70, 200]] = torch.tensor([1.0, 1.0])  # 70 and 200 duplicate 5, in other tiles
    ids = q(torch.tensor([[[[2.0]], [[2.0]]]]).expand(1, 2, 3, 3)).ids
    assert (ids == 5).all()
    assert (q(torch.full((1, 2, 1, 1), -1.0)).ids == 0).all()  # all-zero rows tie too: the first


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def test_vq_reference_size_stays_within_memory_bound():
    """K = 2**16 with 4096 tokens: the full distance matrix would be 1 GiB; the search keeps one
    256 x 65536 tile (64 MiB, the GPU default's size; CPU's default tiles are 16x smaller)."""
    q = make("vq", num_codes=2**16, dim=16, chunk_codes=2**16)
    z = latent(q, b=16, h=16, w=16)
    clear_refs = Path("/proc/self/clear_refs")
    try:
        clear_refs.write_text("5")  # reset the peak resident size to the current one
    except OSError:
        pytest.skip("cannot reset the peak resident size here")
    before = _peak_rss_mib()
    out = q(z)
    grown = _peak_rss_mib() - before
    assert out.ids.shape == (16, 16, 16)
    assert grown < 64 + 32, f"peak memory grew by {grown:.0f} MiB"


def test_vq_losses_and_stats():
    q = make("vq", num_codes=16, dim=4, commitment=0.25)
    z = latent(q, b=2, h=4, w=4)
    out = q(z)
    e = q.decode_ids(out.ids)
    mse = F.mse_loss(z, e).item()
    assert out.stats["codebook"] == pytest.approx(mse) and out.stats["commit"] == pytest.approx(mse)
    assert out.loss.item() == pytest.approx(1.25 * mse)
    used = out.ids.unique().numel()
    assert out.stats["usage"] == pytest.approx(used / 16)
    assert 1 <= out.stats["perplexity"] <= used + 1e-4


def test_vq_init_is_uniform_small():
    q = make("vq", num_codes=1000, dim=4)
    assert q.codebook.abs().max() <= 1 / 1000
    assert "unused_steps" not in q.state_dict()


def test_vq_dead_code_restart():
    q = make("vq", num_codes=8, dim=2, dead_code_restart=True, dead_code_steps=3)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1]] + [[100.0, 100.0]] * 4))
    z = latent(q, b=1, h=8, w=8)
    tokens = z.permute(0, 2, 3, 1).reshape(-1, 2)
    assert q(z).stats["usage"] == 0.5  # the four far codewords are never the nearest
    q(z), q(z)  # three steps without a hit: dead
    out = q(z)  # restarted from this batch's tokens before the search
    restarted = q.codebook[4:].detach()
    assert ((restarted[:, None] - tokens[None]).abs().sum(-1) == 0).any(1).all()
    assert out.stats["usage"] > 0.5
    assert "unused_steps" in q.state_dict()
    q.eval()  # never in evaluation
    before = q.codebook.detach().clone()
    for _ in range(5):
        q(z)
    assert torch.equal(q.codebook, before)


def test_vq_ema_codebook_is_online_k_means():
    """With ema_decay the codebook is a buffer that moves to the mean of the tokens each codeword wins (no
    gradient reaches it): two clusters, two codewords seeded near them, and after enough steps each codeword
    sits at its cluster's mean; the loss is the commitment term alone."""
    q = make("vq", num_codes=2, dim=2, ema_decay=0.9)
    assert "codebook" not in dict(q.named_parameters()) and "ema_sum" in q.state_dict()
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        q.ema_sum.copy_(q.codebook)
    g = torch.Generator().manual_seed(0)
    left, right = torch.randn(32, 2, generator=g) * 0.1 + torch.tensor([-3.0, 1.0]), \
        torch.randn(32, 2, generator=g) * 0.1 + torch.tensor([3.0, 1.0])
    z = torch.cat([left, right]).T.reshape(1, 2, 8, 8)
    for _ in range(100):
        out = q(z)
    assert torch.allclose(q.codebook[0], right.mean(0), atol=1e-3)
    assert torch.allclose(q.codebook[1], left.mean(0), atol=1e-3)
    assert out.loss.item() == pytest.approx(0.25 * out.stats["commit"])
    q.eval()  # evaluation leaves the codebook alone, and decoding gives forward's values
    before = q.codebook.clone()
    out = q(z)
    assert torch.equal(q.codebook, before) and torch.equal(q.decode_ids(out.ids), out.z_q)
    with pytest.raises(ValueError, match="ema_decay"):
        VectorQuantizer(num_codes=4, dim=2, ema_decay=1.0)


def test_vq_normalized_lookup_is_by_angle():
    """normalize: the nearest codeword by direction, not by distance, and z_q is a unit vector."""
    q = make("vq", num_codes=2, dim=2, normalize=True)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[10.0, 0.0], [0.1, 0.1]]))
    z = torch.tensor([0.2, 0.25]).view(1, 2, 1, 1)  # nearer [0.1, 0.1] by distance, by angle too
    far = torch.tensor([0.2, 0.01]).view(1, 2, 1, 1)  # nearer [0.1, 0.1] by distance, [10, 0] by angle
    assert q(z).ids.item() == 1 and q(far).ids.item() == 0
    out = q(torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(3)) * 5)
    assert torch.allclose(out.z_q.norm(dim=1), torch.ones(2, 4, 4))
    assert torch.equal(q.decode_ids(out.ids), out.z_q)


# --- FSQ ------------------------------------------------------------------------------------------


def fsq_ids(q: FSQ, z_q: torch.Tensor) -> torch.Tensor:
    """Ids of grid points, straight from the FSQ grid definition (independent of the module's code)."""
    digits = torch.round(z_q * q.half_width).long() + q.half_width.long()
    radix = torch.tensor([math.prod(q.levels[:i]) for i in range(q.dim)]).view(1, -1, 1, 1)
    return (digits * radix).sum(1)


def fsq_preimage(q: FSQ, ids: torch.Tensor) -> torch.Tensor:
    """A latent z whose every channel lands on the digit that ids asks for, found by a sweep of z values."""
    sweep = torch.linspace(-6, 6, 2001)
    digit_of = fsq_digits(q, sweep.view(1, 1, 1, -1).expand(1, q.dim, 1, -1))[0, :, 0]  # [D, 2001]
    table = torch.zeros(q.dim, max(q.levels))
    for c, levels in enumerate(q.levels):
        for d in range(levels):
            hits = (digit_of[c] == d).nonzero()
            assert len(hits), f"channel {c} never reaches level {d}"
            table[c, d] = sweep[hits[len(hits) // 2, 0]]  # mid-cell, away from the rounding edges
    digits = fsq_digits_of_ids(q, ids)  # [B, D, h, w]
    return torch.stack([table[c][digits[:, c]] for c in range(q.dim)], 1)


def fsq_digits(q, z):
    return fsq_digits_of_ids(q, q(z).ids)


def fsq_digits_of_ids(q, ids):
    out, rest = [], ids.clone()
    for levels in q.levels:
        out.append(rest % levels)
        rest = rest // levels
    return torch.stack(out, 1)


def test_fsq_reference_grid():
    q = FSQ()
    assert q.levels == (8, 8, 8, 5, 5, 5) and q.dim == 6 and q.num_codes == 64000
    grid = q.decode_ids(torch.arange(64000).view(1, 64000, 1))  # [1, 6, 64000, 1]
    points = grid[0, :, :, 0].T
    assert points.unique(dim=0).shape[0] == 64000  # every id is its own point
    assert points.min() == -1 and points.max() == 1
    per_channel = [sorted(points[:, c].unique().tolist()) for c in range(6)]
    assert per_channel[0] == [i / 4 for i in range(-4, 4)]  # 8 levels: -1 .. 0.75
    assert per_channel[5] == [i / 2 for i in range(-2, 3)]  # 5 levels: -1 .. 1, 0 included
    assert torch.equal(fsq_ids(q, grid), torch.arange(64000).view(1, 64000, 1))
    assert q(torch.zeros(1, 6, 1, 1)).z_q.abs().max() == 0  # z = 0 sits on a level


def test_fsq_every_id_reachable_round_trip():
    """ids -> a latent -> forward gives the same ids back, for random ids and the corners of the grid."""
    q = FSQ()
    torch.manual_seed(0)
    ids = torch.cat([torch.randint(64000, (1998,)), torch.tensor([0, 63999])]).view(2, 20, 50)
    out = q(fsq_preimage(q, ids))
    assert torch.equal(out.ids, ids)
    assert torch.equal(out.z_q, q.decode_ids(ids))
    assert out.loss.item() == 0 and not out.loss.requires_grad


def test_fsq_other_levels():
    q = FSQ(levels=(2, 3, 4, 5))
    assert q.num_codes == 120 and q.dim == 4
    z = torch.linspace(-6, 6, 2001).view(1, 1, 1, -1).expand(1, 4, 1, -1)
    out = q(z)
    # z sweeps the diagonal; channel c steps through its L_c levels at its own thresholds: 1 + 1 + 2 + 3 + 4 ids
    assert out.ids.unique().numel() == 11
    assert torch.equal(q.decode_ids(out.ids), out.z_q)
    with pytest.raises(ValueError):
        FSQ(levels=(1, 4))


# --- LFQ and BSQ ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lfq", "bsq"])
def test_binary_ids_are_the_bits(name):
    q = make(name)
    z = latent(q, b=2, h=4, w=4)
    out = q(z)
    bits = (z > 0).long()
    assert torch.equal(out.ids, sum(bits[:, i] << i for i in range(q.dim)))
    assert torch.equal(out.z_q > 0, z > 0)
    ids = torch.randint(q.num_codes, (3, 5, 7))
    ids[0, 0, :3] = torch.tensor([0, q.num_codes - 1, 1])
    code = q.decode_ids(ids)
    assert torch.equal(q(code).ids, ids)  # ids -> bits -> ids
    assert torch.equal(q(code).z_q, code)


@pytest.mark.parametrize("name", ["lfq", "bsq"])
def test_entropy_favours_a_diverse_batch(name):
    """Batch entropy is high when tokens spread over the codebook, and equals the per-token entropy when
    every token is the same, so the entropy loss is lower for a diverse batch than for a collapsed one."""
    q = make(name, commitment=0.0)
    diverse = latent(q, b=4, h=8, w=8)
    collapsed = diverse[:1, :, :1, :1].expand_as(diverse)
    d, c = q(diverse), q(collapsed)
    assert d.stats["batch_entropy"] > 0.9 * q.dim * math.log(2)  # near the maximum, 16 bits in nats
    assert d.stats["batch_entropy"] <= q.dim * math.log(2) + 1e-4
    assert c.stats["batch_entropy"] == pytest.approx(c.stats["entropy"], abs=1e-4)
    assert d.loss < c.loss - 0.3


@pytest.mark.parametrize("name", ["lfq", "bsq"])
def test_entropy_loss_decreases_when_optimized(name):
    """Optimising the aux loss alone makes tokens confident (low per-token entropy) while they stay spread
    (batch entropy near what 1024 confident tokens can reach: 2 groups x ln 256 nats at most)."""
    q = make(name)
    torch.manual_seed(0)
    z = torch.nn.Parameter(0.05 * torch.randn(4, q.dim, 16, 16))
    opt = torch.optim.Adam([z], lr=0.05)
    first = q(z).stats
    for _ in range(60):
        out = q(z)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    last = q(z)
    assert last.loss < q(z.detach() * 0 + 0.05 * torch.randn_like(z)).loss - 0.3
    assert last.stats["entropy"] < 0.5 * first["entropy"]
    assert last.stats["batch_entropy"] > 0.9 * first["batch_entropy"]


def test_lfq_entropy_matches_the_full_codebook_per_token():
    """The per-token entropy summed over groups equals the entropy of the full softmax over all 2^D corners."""
    q = LFQ(dim=8, groups=2)
    z = latent(q, b=1, h=3, w=3)
    corners = torch.tensor([[1.0 if (j >> i) & 1 else -1.0 for i in range(8)] for j in range(256)])
    t = z.permute(0, 2, 3, 1).reshape(-1, 8)
    logp = F.log_softmax(-torch.cdist(t, corners).square(), dim=1)
    full = -(logp.exp() * logp).sum(1).mean()
    assert q(z).stats["entropy"] == pytest.approx(full.item(), rel=1e-5)
    with pytest.raises(ValueError):
        LFQ(dim=10, groups=3)


def test_lfq_commitment():
    q = LFQ(entropy_weight=0.0, commitment=0.025)
    z = latent(q)
    out = q(z)
    assert out.stats["commit"] == pytest.approx(F.mse_loss(z, z.sign()).item())
    assert out.loss.item() == pytest.approx(0.025 * out.stats["commit"])


def test_bsq_unit_norm():
    q = BSQ()
    z = latent(q, b=2, h=4, w=4, scale=7.0)
    out = q(z)
    assert torch.allclose(out.z_q.norm(dim=1), torch.ones(2, 4, 4))
    assert torch.allclose(q.decode_ids(torch.randint(q.num_codes, (1, 3, 3))).norm(dim=1), torch.ones(1, 3, 3))
    assert set(out.z_q.abs().unique().tolist()) == {0.25}


def test_bsq_entropy_is_lfq_on_the_scaled_sphere():
    """The default temperature 1/D makes BSQ's entropies those of LFQ (temperature 1) on sqrt(D) * u."""
    bsq, lfq = BSQ(), LFQ()
    z = latent(bsq, b=2, h=4, w=4, scale=3.0)
    b = bsq(z).stats
    l_ = lfq(F.normalize(z, dim=1) * 4).stats
    for key in ("entropy", "batch_entropy", "commit"):
        assert b[key] == pytest.approx(l_[key], rel=1e-5), key
    assert BSQ(temperature=0.5).temperature == 0.5
