"""gqtok/core/priors.py and training/priors.py: the numpy priors, their torch twin, the wavefront, the fit."""

import math

import numpy as np
import pytest
import torch

from gqtok.core.artifact import load_artifact
from gqtok.core.priors import NEIGHBOURS, ContextPrior, fit_record, load_priors, neighbour_features, wavefront
from gqtok.training.priors import ContextNet, bits_per_token, context_dataset


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


def test_numpy_prior_matches_its_torch_twin():
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    channels, token_dim, k = 8, 4, 64
    codebook = rng.standard_normal((k, token_dim)).astype(np.float32)
    net = ContextNet(channels, token_dim, codebook, np.log(rng.dirichlet(np.ones(k), size=2)), hidden=16)
    for p in net.parameters():  # random weights, not the near-flat start
        torch.nn.init.normal_(p, std=0.3)
    prior = ContextPrior(net.weights(), codebook, token_dim, b"")
    feats = rng.standard_normal((10, len(NEIGHBOURS) * (channels + 1))).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(feats)).numpy()
    got = prior.logits(feats)
    assert got.shape == (10, 2, k)
    # logits are defined up to a constant per row: compare log-softmax (large with these weights: float32
    # rounding is relative)
    norm = lambda z: z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
    np.testing.assert_allclose(norm(got), norm(expected), rtol=1e-5, atol=2e-3)
    assert np.abs(norm(expected)).max() > 10  # the Gaussian term matters here: the comparison can fail


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
    feats, targets = context_dataset(grids, artifact.codebook)
    record = fit_record(artifact)["heldout_bits_per_token"]
    assert bits_per_token(priors["context"].logits(feats), targets) == pytest.approx(record["context"], abs=1e-4)
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
