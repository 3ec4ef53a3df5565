"""GQ selection (gqtok/core/select.py with its k-d tree, the torch GaussianQuantize in training/gq.py) against a
brute-force reference, and the exact rule: the same ids as exhaustive float64 scoring, whatever BLAS, threads or
SIMD do."""

import math
import tracemalloc

import numpy as np
import pytest
import torch

from conftest import run_under_each_env
from gqtok.core.codebook import make_codebook
from gqtok.core.select import (ROW_CHUNK, TOKEN_BLOCK, GaussianQuantizer, exact_scores,
                               exact_token_features, portable_exp)
from gqtok.training import gq as torch_gq


def brute_force_scores(mu, logvar, codebook, beta=1.0):
    """float64 sum_i log N(c_i; mu_i, s_i^2) - beta log N(c_i; 0, 1) for every (token, codeword): [N, K]."""
    c = codebook.astype(np.float64)[None]
    log_p = -0.5 * (c**2 + np.log(2 * np.pi))
    out = []
    for s in range(0, len(mu), 8):  # a few tokens at a time: [8, K, d] float64 stays small
        m = mu[s : s + 8].astype(np.float64)[:, None, :]
        var = np.exp(np.clip(logvar[s : s + 8], -30, 20).astype(np.float64))[:, None, :]
        log_q = -0.5 * ((c - m) ** 2 / var + np.log(2 * np.pi * var))
        out.append((log_q - beta * log_p).sum(-1))
    return np.concatenate(out)


def random_posteriors(n, d, seed=0):
    rng = np.random.default_rng(seed)
    mu = rng.standard_normal((n, d)).astype(np.float32)
    logvar = rng.uniform(-6, 0.5, (n, d)).astype(np.float32)
    return mu, logvar


def assert_matches_reference(ids, mu, logvar, codebook, beta=1.0):
    scores = brute_force_scores(mu, logvar, codebook, beta)
    best = scores.argmax(1)
    rows = np.arange(len(ids))
    gap = scores[rows, best] - scores[rows, ids]
    # Equal ids, or a float32 near-tie: the chosen codeword scores within rounding of the best.
    scale = np.abs(scores[rows, best]) + 1.0
    assert np.all((ids == best) | (gap <= 1e-5 * scale)), f"{np.sum(ids != best)} wrong picks, max gap {gap.max()}"
    assert np.mean(ids == best) >= 0.999


def exhaustive_exact_ids(mu, logvar, codebook, beta=1.0):
    """The rule by its definition: exact_scores against every codeword, first maximum (the lowest index) wins."""
    feats = exact_token_features(mu, logvar, beta)
    k = len(codebook)
    return np.array([exact_scores(np.repeat(f[None], k, 0), codebook).argmax() for f in feats])


@pytest.mark.parametrize("n,k,d,beta", [(1, 256, 4, 1.0), (7, 1000, 16, 1.0), (333, 4096, 8, 1.0),
                                        (100, 2**16, 16, 1.0), (513, 512, 2, 0.0), (64, 300, 3, 0.5),
                                        (300, 33, 2, 2.0), (5, 1, 3, 1.0)])
def test_selection_is_the_exact_argmax(n, k, d, beta):
    mu, logvar = random_posteriors(n, d, seed=n)
    codebook = make_codebook(3, k, d)
    ids = GaussianQuantizer(codebook, beta).select(mu, logvar)
    assert ids.shape == (n,) and ids.dtype == np.int64
    assert np.array_equal(ids, exhaustive_exact_ids(mu, logvar, codebook, beta))
    assert_matches_reference(ids, mu, logvar, codebook, beta)  # and the score is the density ratio


@pytest.mark.parametrize("k,d,sharp", [(2**16, 16, 3), (4096, 8, 1), (1000, 4, 2)])
def test_the_tree_search_gives_the_ids_of_the_exhaustive_search(k, d, sharp):
    """Posteriors like the default model's: one coordinate much sharper than the rest (sigma 0.02-0.06), a few
    sharp ones (0.1-0.3), the rest within 3% of the prior. The tree gives the same ids as scoring every codeword,
    and computes the deficit of a small part of the codebook."""
    rng = np.random.default_rng(k + d)
    mu = rng.standard_normal((3000, d)).astype(np.float32)
    sigma = rng.uniform(0.97, 1.03, (3000, d))
    sigma[:, :sharp] = rng.uniform(0.1, 0.3, (3000, sharp))
    sigma[:, 0] = rng.uniform(0.02, 0.06, 3000)
    logvar = np.log(sigma**2).astype(np.float32)
    q = GaussianQuantizer(make_codebook(4, k, d))
    stats = {}
    ids = q.select(mu, logvar, stats=stats)
    assert np.array_equal(ids, q.select(mu, logvar, exhaustive=True))
    assert stats["scored"] < {2**16: 0.12, 4096: 0.2, 1000: 0.5}[k] * stats["pairs"], stats
    assert stats["candidates"] < 1.01 * 3000 and stats.get("fallback", 0) == 0, stats
    assert np.array_equal(ids[:5], exhaustive_exact_ids(mu[:5], logvar[:5], q.codebook))


def test_non_finite_posteriors_are_refused():
    q = GaussianQuantizer(make_codebook(0, 64, 2))
    with pytest.raises(ValueError, match="finite"):
        q.select(np.array([[np.nan, 0.0]], np.float32), np.zeros((1, 2), np.float32))


def test_ties_go_to_the_lowest_index():
    codebook = make_codebook(0, 5000, 4)
    codebook[4321] = codebook[17]  # the same codeword twice, in different chunks
    codebook[1234] = codebook[17]
    mu, logvar = codebook[[17, 17, 4321]], np.full((3, 4), -2.0, np.float32)
    assert GaussianQuantizer(codebook).select(mu, logvar).tolist() == [17, 17, 17]


def test_sharp_posteriors_pick_the_nearest_codeword_exactly():
    """logvar at its -30 clamp: 1/sigma^2 ~ 1e13, where float32 scores cannot tell near codewords apart; the
    exact rescoring still picks the codeword nearest the mean (here: a codeword moved by 1e-4 in one coordinate)."""
    codebook = make_codebook(1, 2**14, 8)
    rng = np.random.default_rng(0)
    want = rng.choice(len(codebook), 300, replace=False)
    mu = codebook[want].copy()
    mu[np.arange(300), rng.integers(0, 8, 300)] += 1e-4
    logvar = np.full_like(mu, -30.0)
    ids = GaussianQuantizer(codebook).select(mu, logvar)
    assert np.array_equal(ids, want)
    assert np.array_equal(ids[:20], exhaustive_exact_ids(mu[:20], logvar[:20], codebook))


def near_ties(codebook, count, rng):
    """Posteriors for which two codewords differ by one float32 ulp in one coordinate, the later one (higher
    index) nearer the score's peak: float32 scores cannot tell them apart, the exact score prefers the later
    one. Changes `codebook` in place; returns mu, logvar and the exact winners."""
    d, logvar = codebook.shape[1], -3.0
    a = rng.choice(len(codebook) // 2, count, replace=False)
    b = a + len(codebook) // 2
    mu = codebook[a] + rng.uniform(-0.02, 0.02, (count, d)).astype(np.float32)
    # per coordinate the score (1 - 1/s^2) c^2 + 2 mu c / s^2 peaks at c = mu / (1 - s^2), beyond the mean
    peak = mu[:, 0] / (1.0 - np.exp(logvar))
    codebook[b] = codebook[a]
    codebook[b, 0] = np.nextafter(codebook[a, 0], np.where(peak > codebook[a, 0], np.inf, -np.inf).astype(np.float32))
    return mu, np.full_like(mu, logvar), b


def test_near_ties_are_decided_by_the_exact_score():
    codebook = make_codebook(2, 2**14, 8)
    mu, logvar, want = near_ties(codebook, 200, np.random.default_rng(3))
    ids = GaussianQuantizer(codebook).select(mu, logvar)
    assert np.array_equal(ids, want)
    assert np.array_equal(ids[:10], exhaustive_exact_ids(mu[:10], logvar[:10], codebook))


def test_portable_exp_is_accurate():
    x = np.concatenate([np.linspace(-700, 700, 200_001), [-30.0, 0.0, 20.0, 1e-300, -1e-300]])
    want = np.array([math.exp(v) for v in x])
    assert np.max(np.abs(portable_exp(x) / want - 1.0)) < 1e-15


SELECT_IN_A_SUBPROCESS = """
import hashlib, sys
import numpy as np
from gqtok.core.select import GaussianQuantizer

case = np.load(sys.argv[1])
q = GaussianQuantizer(case["codebook"])
for exhaustive in (False, True):
    print(hashlib.sha256(q.select(case["mu"], case["logvar"], exhaustive=exhaustive).tobytes()).hexdigest())
"""


def test_ids_are_the_same_under_every_blas_kernel_thread_count_and_simd_setting(tmp_path):
    """Selection in subprocesses under different OpenBLAS kernels, thread counts and numpy SIMD features, by the
    tree and by the exhaustive search: the same ids every time (near-ties included)."""
    rng = np.random.default_rng(11)
    codebook = make_codebook(5, 2**16, 16)
    mu, logvar = random_posteriors(3000, 16, seed=11)
    tie_mu, tie_logvar, _ = near_ties(codebook, 300, rng)  # float32 cannot decide these
    sharp_mu = codebook[:200] + rng.uniform(-1e-4, 1e-4, (200, 16)).astype(np.float32)  # logvar at its clamp
    np.savez(tmp_path / "case.npz", codebook=codebook, mu=np.concatenate([mu, tie_mu, sharp_mu]),
             logvar=np.concatenate([logvar, tie_logvar, np.full_like(sharp_mu, -30.0)]))
    script = tmp_path / "selection_ids.py"  # not select.py: that would shadow the standard library's module
    script.write_text(SELECT_IN_A_SUBPROCESS)
    hashes = run_under_each_env(script, tmp_path / "case.npz")
    assert all(len(h) == 2 for h in hashes) and len({x for h in hashes for x in h}) == 1, hashes


def test_huge_codebook_few_tokens():
    mu, logvar = random_posteriors(3, 4, seed=1)
    codebook = make_codebook(0, 2**18, 4)
    assert_matches_reference(GaussianQuantizer(codebook).select(mu, logvar), mu, logvar, codebook)
    ids_t = torch_gq.GaussianQuantize(2**18, 4, seed=0).select(torch.from_numpy(mu), torch.from_numpy(logvar)).numpy()
    assert_matches_reference(ids_t, mu, logvar, codebook)


def test_density_ratio_is_not_nearest_neighbour():
    # Dividing by the prior favours codewords the prior finds less likely (farther from the origin).
    codebook = np.array([[1.0], [1.5]], dtype=np.float32)
    mu, logvar = np.array([[1.2]], np.float32), np.array([[0.0]], np.float32)
    assert GaussianQuantizer(codebook, beta=0.0).select(mu, logvar)[0] == 0  # plain distance: 1.0 is nearer
    assert GaussianQuantizer(codebook, beta=1.0).select(mu, logvar)[0] == 1  # density ratio: 1.5


@pytest.mark.parametrize("backend", ["tree", "exhaustive", "torch"])
def test_tokens_do_not_depend_on_batch_composition(backend):
    n, d, k = 3 * ROW_CHUNK + 17, 16, 2**14
    mu, logvar = random_posteriors(n, d, seed=5)
    if backend != "torch":
        q = GaussianQuantizer(make_codebook(0, k, d))
        run = lambda m, v: q.select(m, v, exhaustive=backend == "exhaustive")  # noqa: E731
    else:
        q = torch_gq.GaussianQuantize(k, d, seed=0)
        run = lambda m, v: q.select(torch.from_numpy(m), torch.from_numpy(v)).numpy()  # noqa: E731
    together = run(mu, logvar)
    alone = np.array([run(mu[i : i + 1], logvar[i : i + 1])[0] for i in range(0, n, 37)])
    assert np.array_equal(alone, together[::37])
    perm = np.random.default_rng(1).permutation(n)
    assert np.array_equal(run(mu[perm], logvar[perm]), together[perm])
    # odd-sized groups put each token at a different row of its chunk
    parts = np.concatenate([run(mu[s : s + 101], logvar[s : s + 101]) for s in range(0, n, 101)])
    assert np.array_equal(parts, together)


def test_numpy_and_torch_agree():
    mu, logvar = random_posteriors(4000, 16, seed=9)
    ids_np = GaussianQuantizer(make_codebook(7, 2**16, 16)).select(mu, logvar)
    ids_t = torch_gq.GaussianQuantize(2**16, 16, seed=7).select(torch.from_numpy(mu), torch.from_numpy(logvar)).numpy()
    assert np.mean(ids_np == ids_t) >= 0.999


def test_memory_stays_bounded_for_100k_tokens():
    """Beyond the ids, a constant: tokens go TOKEN_BLOCK at a time, each a few hundred bytes; never a [tokens, K]
    matrix (that would be 800 MB here). The tree is built by a first call, before the measured ones."""
    d, k = 4, 2**11
    q = GaussianQuantizer(make_codebook(0, k, d))
    q.select(*random_posteriors(10, d, seed=1))
    peaks = {}
    for n in (20_000, 100_000):
        mu, logvar = random_posteriors(n, d, seed=2)
        tracemalloc.start()
        ids = q.select(mu, logvar)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert ids.shape == (n,) and ids.max() < k
    beyond_ids = {n: peak - 8 * n for n, peak in peaks.items()}
    assert beyond_ids[100_000] <= beyond_ids[20_000] + 2**16, peaks
    assert beyond_ids[100_000] <= TOKEN_BLOCK * 1024, peaks


def test_lookup_rejects_out_of_range():
    q = GaussianQuantizer(make_codebook(0, 16, 2))
    assert q.lookup(np.array([[0, 15]])).shape == (1, 2, 2)
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        q.lookup(np.array([16]))
    with pytest.raises(ValueError):
        q.select(np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32))


def test_latent_round_trip_through_torch_quantizer():
    q = torch_gq.GaussianQuantize(256, 4, seed=0)
    z = torch.from_numpy(make_codebook(0, 256, 4)[:24].reshape(1, 2, 3, 4, 4)).permute(0, 4, 1, 2, 3)  # codewords as latents
    z = z.reshape(1, 8, 3, 4)
    quantized, ids, aux = q(z, torch.full_like(z, -20.0))  # tiny sigma: the exact codeword wins
    assert ids.shape == (1, 2, 3, 4) and torch.equal(quantized, z) and torch.equal(q.get_output_from_indices(ids), z)
    assert float(aux["shift_sigmas"].max()) == 0.0
