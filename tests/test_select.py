"""GQ selection (numpy in gqtok/core/select.py, the torch GaussianQuantize in training/gq.py) against a brute-force reference."""

import tracemalloc

import numpy as np
import pytest
import torch

from gqtok.core.codebook import make_codebook
from gqtok.core.select import CODE_CHUNK, ROW_CHUNK, GaussianQuantizer, select_from_features, token_features
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


@pytest.mark.parametrize("n,k,d,beta", [(1, 256, 4, 1.0), (7, 1000, 16, 1.0), (333, 4096, 8, 1.0),
                                        (100, 2**16, 16, 1.0), (513, 512, 2, 0.0), (64, 300, 3, 0.5)])
def test_numpy_selection_equals_brute_force(n, k, d, beta):
    mu, logvar = random_posteriors(n, d, seed=n)
    codebook = make_codebook(3, k, d)
    ids = GaussianQuantizer(codebook, beta).select(mu, logvar)
    assert ids.shape == (n,) and ids.dtype == np.int64
    assert_matches_reference(ids, mu, logvar, codebook, beta)


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


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_tokens_do_not_depend_on_batch_composition(backend):
    n, d, k = 3 * ROW_CHUNK + 17, 16, 2**14
    mu, logvar = random_posteriors(n, d, seed=5)
    if backend == "numpy":
        q = GaussianQuantizer(make_codebook(0, k, d))
        run = q.select
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
    n, d, k = 100_000, 4, 2**11
    mu, logvar = random_posteriors(n, d, seed=2)
    q = GaussianQuantizer(make_codebook(0, k, d))
    feats = token_features(mu, logvar, 1.0)
    tracemalloc.start()
    ids = select_from_features(feats, q.features)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    bound = n * 8 + q.features.nbytes + 4 * ROW_CHUNK * (CODE_CHUNK + 4 * d + 2) + 8 * ROW_CHUNK * 8
    assert peak <= bound, (peak, bound)
    assert ids.shape == (n,) and ids.max() < k


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
