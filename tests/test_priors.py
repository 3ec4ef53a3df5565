"""gqtok/core/priors.py and training/priors.py: the numpy priors, their torch twin, the wavefront, the fit."""

import math

import numpy as np
import pytest
import torch

from gqtok.core.artifact import load_artifact
from gqtok.core.priors import NEIGHBOURS, cell_count, fit_record, latent_of, load_priors, neighbour_features, wavefront
from gqtok.training.priors import ContextNet, context_bits, context_prior, partition_codebook


@pytest.mark.parametrize("h,w", [(1, 1), (1, 6), (5, 1), (4, 7), (9, 3)])
def test_wavefront_visits_every_position_once_after_all_its_neighbours(h, w):
    steps = wavefront(h, w)
    step_of = np.full((h, w), -1)
    for s, (rows, cols) in enumerate(steps):
        assert (step_of[rows, cols] == -1).all()
        step_of[rows, cols] = s
    assert (step_of >= 0).all() and len(steps) == len({2 * r + c for r in range(h) for c in range(w)})
    assert all(len(rows) for rows, _ in steps)
    for r in range(h):
        for c in range(w):
            for dy, dx in NEIGHBOURS:
                if 0 <= r + dy < h and 0 <= c + dx < w:
                    assert step_of[r + dy, c + dx] < step_of[r, c]


def test_neighbour_features_mark_positions_outside_the_grid():
    latent = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4) + 1
    f = neighbour_features(latent, np.array([0, 2]), np.array([0, 3])).reshape(2, len(NEIGHBOURS), 3)
    assert (f[0] == 0).all()  # the first position has no decoded neighbours
    up = NEIGHBOURS.index((-1, 0))
    assert f[1, up].tolist() == [latent[0, 1, 3], latent[1, 1, 3], 1.0]
    assert f[1, NEIGHBOURS.index((-1, 1))].tolist() == [0, 0, 0]  # up-right of the last column is outside


def _random_prior(k=256, channels=8, token_dim=4, hidden=16, std=0.3, seed=0):
    """A context model with random weights (not the near-flat start): its torch net and fixed-point prior."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    codebook = rng.standard_normal((k, token_dim)).astype(np.float32)
    cells = partition_codebook(codebook, cell_count(k))
    net = ContextNet(channels, token_dim, codebook, np.log(rng.dirichlet(np.ones(k), size=channels // token_dim)),
                     hidden, cells)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=std)
    return net, context_prior(net.weights(), cells, codebook, token_dim), codebook


def test_the_fixed_point_prior_codes_what_its_float_twin_predicts():
    """ContextPrior's integer code lengths against the torch model's cross-entropy, token by token."""
    net, prior, codebook = _random_prior(std=0.1)  # larger weights push ids past the exp table's 16 nats
    rng = np.random.default_rng(1)
    grid = rng.integers(0, 256, (2, 6, 9))
    latent = latent_of(codebook, grid.reshape(2, -1).T).T.reshape(-1, 6, 9)
    rows, cols = np.indices((6, 9)).reshape(2, -1)
    feats = neighbour_features(latent, rows, cols)
    targets = torch.from_numpy(grid[:, rows, cols].T.copy())
    with torch.no_grad():
        cell_logits, member_logits = net(torch.from_numpy(feats), targets)
        t = targets.reshape(-1)
        nats = (torch.nn.functional.cross_entropy(cell_logits, net.cell_of[t], reduction="none")
                + torch.nn.functional.cross_entropy(member_logits, net.index_in_cell[t], reduction="none"))
    float_bits = nats.numpy() / math.log(2)
    fixed_bits = prior.code_lengths(grid)
    assert float_bits.std() > 1  # the weights matter here: the comparison can fail
    np.testing.assert_allclose(fixed_bits, float_bits, atol=0.1)
    assert abs(fixed_bits.mean() - float_bits.mean()) < 0.02


def test_the_fixed_point_prior_is_exact_whatever_the_batch():
    """Integer arithmetic: a position's frequencies do not depend on which other positions share its product."""
    _, prior, codebook = _random_prior()
    feats = prior.features(prior.latent_of(np.random.default_rng(2).integers(0, 256, (40, 2))).T.reshape(-1, 5, 8),
                           *np.indices((5, 8)).reshape(2, -1))
    cell_freq, coef = prior.heads(feats)
    cells = np.argmax(cell_freq, axis=1)
    member_freq = prior.member_frequencies(coef, cells)
    for i in (0, 7, 39):
        one_cell, one_coef = prior.heads(feats[i : i + 1])
        assert np.array_equal(one_cell[0], cell_freq[2 * i]) and np.array_equal(one_coef, coef[2 * i : 2 * i + 2])
        assert np.array_equal(prior.member_frequencies(one_coef, cells[2 * i : 2 * i + 2]), member_freq[2 * i : 2 * i + 2])
    assert (cell_freq == cell_freq.round()).all() and cell_freq.max() == 2**20


def test_weights_too_large_for_exact_arithmetic_are_refused():
    with pytest.raises(ValueError, match="cannot compute exactly"):
        _random_prior(std=3000.0)


def test_the_cells_are_a_balanced_partition_of_nearby_codewords():
    codebook = np.random.default_rng(3).standard_normal((4096, 8)).astype(np.float32)
    cells = partition_codebook(codebook, 64)
    assert cells.shape == (64, 64) and np.array_equal(np.sort(cells, axis=None), np.arange(4096))
    spread = lambda groups: np.mean([codebook[g].var(axis=0).sum() for g in groups])
    random_cells = np.random.default_rng(4).permutation(4096).reshape(64, 64)
    assert spread(cells) < 0.6 * spread(random_cells)  # a cell's codewords lie closer together than chance
    assert cell_count(65536) == 256 and cell_count(256) == 16 and cell_count(512) == 32


@pytest.mark.slow
def test_fitted_priors_beat_uniform_on_held_out_photos(tiny_model):
    record = fit_record(load_artifact(tiny_model))
    held = record["heldout_bits_per_token"]
    assert held["photos"] == 3 and held["uniform"] == 8.0
    assert held["context"] < held["frequency"] < held["uniform"]
    assert record["train_photos"] == 12 and record["config"]["steps"] == 100


@pytest.mark.slow
def test_recorded_bits_are_what_the_numpy_prior_gives(tiny_model, small_photos):
    """The fit's held-out figure is recomputed here from the saved files, through a separate path."""
    from gqtok.service.runtime import TokenizerRuntime
    from gqtok.photos import center_crop, list_images, load_rgb, split_heldout
    from gqtok.training.priors import _frequency_bits

    artifact = load_artifact(tiny_model)
    priors = load_priors(artifact)
    rt = TokenizerRuntime(artifact, device="cpu")
    held = split_heldout(list_images(small_photos))[1]
    grids = np.stack([rt.tokenize(center_crop(load_rgb(p), (128, 192))[None])[0] for p in held])
    record = fit_record(artifact)["heldout_bits_per_token"]
    assert context_bits(priors["context"], grids) == pytest.approx(record["context"], abs=1e-9)
    assert _frequency_bits(priors["frequency"].counts, grids) == pytest.approx(record["frequency"], abs=1e-6)
    assert math.log2(priors["uniform"].num_codes) == record["uniform"]


@pytest.mark.slow
def test_a_prior_file_that_does_not_fit_the_model_is_refused(tiny_model, tmp_path):
    import shutil

    from gqtok.core.priors import save_frequency
    from gqtok.training.priors import add_files_to_manifest

    copy = tmp_path / "m"
    shutil.copytree(tiny_model, copy)
    save_frequency(copy / "prior_frequency.npz", np.ones((2, 100), dtype=np.int64))
    add_files_to_manifest(copy, ["prior_frequency.npz"])
    with pytest.raises(ValueError, match=r"counts of shape \(2, 100\)"):
        load_priors(load_artifact(copy))
