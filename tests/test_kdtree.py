"""The codebook's k-d tree (gqtok/core/kdtree.py): its structure, and that its candidates always hold the exact
winner, whatever the tree's metric, the thread count or the ties."""

import numpy as np
import pytest

from gqtok.core.codebook import make_codebook
from gqtok.core.kdtree import CAPACITY, CodebookTree
from gqtok.core.select import GaussianQuantizer, exact_token_features, exact_winners
from test_select import exhaustive_exact_ids, random_posteriors


@pytest.mark.parametrize("k,d", [(1, 3), (33, 2), (1000, 4), (4096, 16)])
def test_leaves_partition_the_codebook_and_boxes_hold_their_codewords(k, d):
    codebook = make_codebook(0, k, d)
    tree = CodebookTree(codebook, np.linspace(0.1, 10, d))
    assert np.array_equal(np.sort(tree.ids), np.arange(k))
    num_leaves = len(tree.leaves)
    for leaf in range(num_leaves):
        points = codebook[tree.ids[tree.leaf_start[leaf] : tree.leaf_start[leaf + 1]]]
        assert 0 < len(points) <= 32
        assert np.array_equal(tree.leaves[leaf, :, : len(points)], points.T)
        node = num_leaves + leaf
        while node >= 1:  # every ancestor's box holds the leaf's codewords
            assert np.all(tree.box_low[node] <= points) and np.all(points <= tree.box_high[node])
            node //= 2


def test_the_sharp_coordinates_are_split_most():
    """The metric: with one coordinate 10,000 times as sharp as the others, the leaves are thin along it."""
    codebook = make_codebook(1, 2**14, 4)
    tree = CodebookTree(codebook, np.array([1e4, 1.0, 1.0, 1.0]))
    leaves = slice(len(tree.leaves), None)
    extent = (tree.box_high[leaves] - tree.box_low[leaves]).mean(axis=0)
    assert extent[0] < 0.1 * extent[1:].min(), extent


def test_the_trees_metric_changes_the_work_not_the_ids():
    """Tokens sharp in their first three coordinates: a tree split in that metric, in the opposite one (sharp
    last) and in a flat one give the same ids as the exhaustive search; the right metric does the least work."""
    d = 8
    codebook = make_codebook(2, 2**13, d)
    rng = np.random.default_rng(3)
    mu = rng.standard_normal((500, d)).astype(np.float32)
    sigma = np.concatenate([rng.uniform(0.05, 0.3, (500, 3)), rng.uniform(0.9, 1.1, (500, d - 3))], axis=1)
    logvar = np.log(sigma**2).astype(np.float32)
    want = GaussianQuantizer(codebook).select(mu, logvar, exhaustive=True)
    assert np.array_equal(want[:20], exhaustive_exact_ids(mu[:20], logvar[:20], codebook))
    scored = {}
    for name, weights in {"sharp_first": [100.0] * 3 + [0.01] * 5, "sharp_last": [0.01] * 5 + [100.0] * 3,
                          "flat": [1.0] * d}.items():
        q = GaussianQuantizer(codebook)
        q.tree = CodebookTree(codebook, np.array(weights))
        stats = {}
        assert np.array_equal(q.select(mu, logvar, stats=stats), want), name
        scored[name] = stats["scored"]
    assert scored["sharp_first"] < 0.5 * min(scored["sharp_last"], scored["flat"]), scored


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_ids_do_not_depend_on_the_thread_count(threads):
    mu, logvar = random_posteriors(1000, 16, seed=4)
    codebook = make_codebook(3, 2**14, 16)
    features = exact_token_features(mu, logvar, 1.0)
    tree = CodebookTree(codebook, np.median(-features[:, :16], axis=0), threads=threads)
    rows, ids, overflow = tree.candidates(features)
    assert len(overflow) == 0 and np.array_equal(np.unique(rows), np.arange(1000))
    assert np.array_equal(exact_winners(features, codebook, rows, ids),
                          GaussianQuantizer(codebook).select(mu, logvar, exhaustive=True))


def test_more_ties_than_capacity_go_to_the_exhaustive_search():
    """CAPACITY + 4 copies of one codeword: the tree reports the token as overflow, the exhaustive search takes
    it, and the lowest index of the copies wins."""
    codebook = make_codebook(4, 4096, 4)
    copies = np.arange(100, 100 + 40 * (CAPACITY + 4), 40)
    codebook[copies] = codebook[copies[-1]]
    mu = np.stack([codebook[copies[0]], codebook[7]]).astype(np.float32)
    logvar = np.full_like(mu, -4.0)
    q = GaussianQuantizer(codebook)
    stats = {}
    ids = q.select(mu, logvar, stats=stats)
    assert ids.tolist() == [copies[0], 7]
    assert stats["fallback"] == 1
    _, _, overflow = q.tree.candidates(exact_token_features(mu, logvar, 1.0))
    assert overflow.tolist() == [0]
