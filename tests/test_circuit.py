"""gqtok/core/circuit.py and training/circuit.py: the HCLT coder computes the model's exact conditionals, in
integers that are the same on any machine, marginalizes absent variables, and learns something real."""

import hashlib
import itertools

import numpy as np
import pytest

from gqtok.core.circuit import HCLT, Tree, load_circuit, quantize, save_circuit


def random_hclt(seed: int, parent, hidden: int, values: int, normalized: bool = True) -> HCLT:
    """Random parameters from an integer generator; normalized: rows through quantize, as learned circuits are
    (the coder reads each row as a distribution with the common total 2^20), else the raw integers (the same
    arrays on any machine, whatever its float summation order)."""
    rng = np.random.default_rng(seed)
    d = len(parent)
    arrays = [rng.integers(1, 1 << 16, hidden), rng.integers(1, 1 << 16, (d, hidden, hidden)),
              rng.integers(1, 1 << 16, (d, hidden, values))]
    return HCLT(parent, *(quantize(a) if normalized else a for a in arrays))


def brute_force_joint(c: HCLT) -> np.ndarray:
    """p(x) for every x of a small HCLT, by summing over every hidden assignment (float, from its integers)."""
    root = c.root / c.root.sum()
    trans = c.transition / c.transition.sum(axis=2, keepdims=True)
    emis = c.emission / c.emission.sum(axis=2, keepdims=True)
    d, h, v = c.emission.shape
    joint = np.zeros((v,) * d)
    for z in itertools.product(range(h), repeat=d):
        weight = root[z[c.tree.root]] * np.prod([trans[i, z[p], z[i]] for i, p in enumerate(c.tree.parent) if p >= 0])
        table = np.ones(())
        for i in range(d):
            table = np.multiply.outer(table, emis[i, z[i]])
        joint += weight * table
    return joint


def test_preorder_conditionals_are_the_exact_model_conditionals():
    # a tree whose preorder is not the index order, with a node of two children and a chain
    parent = [2, 2, -1, 1]
    c = random_hclt(0, parent, hidden=3, values=3)
    joint = brute_force_joint(c)
    assert list(c.tree.order) == [2, 0, 1, 3]
    for x in itertools.product(range(3), repeat=4):
        seen = {}

        def check(node, freq, rows):
            # p(X_node = v | the variables coded before it), from the joint by summing out the rest
            axes = tuple(i for i in range(4) if i != node and i not in seen)
            marginal = joint.sum(axis=axes) if axes else joint
            kept = sorted([node, *seen])
            index = tuple(seen[i] if i in seen else slice(None) for i in kept)
            want = marginal[index]
            np.testing.assert_allclose(freq[0] / freq[0].sum(), want / want.sum(), rtol=2e-4)
            seen[node] = x[node]
            return np.array([x[node]])

        c.run(1, check)


def test_absent_variables_are_marginalized_exactly():
    parent = [-1, 0, 0, 1]
    c = random_hclt(1, parent, hidden=3, values=3)
    joint = brute_force_joint(c)
    present = np.array([[True, False, True, True]])
    got = {}

    def record(node, freq, rows):
        got[node] = freq[0] / freq[0].sum()
        return np.array([0])

    c.run(1, record, present)
    assert 1 not in got and list(c.tree.order) == [0, 1, 3, 2]  # 1 never asked for
    # variable 3 (a child of the absent 1) after x0 = 0: x1 and x2 summed out
    want = joint[0].sum(axis=(0, 1))
    np.testing.assert_allclose(got[3], want / want.sum(), rtol=2e-4)
    # variable 2 after x0 = 0 and x3 = 0, x1 summed out
    want = joint[0, :, :, 0].sum(axis=0)
    np.testing.assert_allclose(got[2], want / want.sum(), rtol=2e-4)


def test_round_trip_and_the_stream_matches_the_code_lengths():
    c = random_hclt(2, [-1, 0, 1, 1, 0, 4, 5, 5], hidden=8, values=11)
    rng = np.random.default_rng(3)
    x = rng.integers(0, 11, (300, 8))
    present = rng.random((300, 8)) > 0.2
    words = c.encode(x, present)
    decoded = c.decode(words, 300, present)
    assert np.array_equal(decoded[present], x[present]) and (decoded[~present] == 0).all()
    ideal = c.code_lengths(x, present).sum()
    assert ideal - 64 <= 32 * len(words) <= ideal + 64  # the range coder's overhead: a word or two
    with pytest.raises(ValueError, match="samples must be"):
        c.encode(np.full((2, 8), 11))


def test_tree_refuses_what_is_not_a_tree():
    with pytest.raises(ValueError, match="one root"):
        Tree([-1, -1, 0])
    with pytest.raises(ValueError, match="not a tree"):
        Tree([-1, 2, 1])
    with pytest.raises(ValueError, match=">= 1"):
        HCLT([-1, 0], np.ones(2), np.ones((2, 2, 2)), np.zeros((2, 2, 3)))


def test_quantize_keeps_every_value_possible():
    q = quantize(np.array([[1.0, 0.0, 1e-12], [0.2, 0.3, 0.5]]))
    assert q.dtype == np.int64 and (q >= 1).all() and abs(q[1].sum() - 2**20) <= 2


def test_file_round_trip(tmp_path):
    c = random_hclt(4, [-1, 0, 0], hidden=4, values=5)
    save_circuit(tmp_path / "c.npz", c, {"note": "x"}, order=np.arange(7))
    loaded, info, extra = load_circuit((tmp_path / "c.npz").read_bytes())
    assert info == {"note": "x"} and np.array_equal(extra["order"], np.arange(7))
    assert all(np.array_equal(a, b) for a, b in zip(loaded.arrays().values(), c.arrays().values()))


ENCODE_IN_A_SUBPROCESS = """
import hashlib, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from test_circuit import random_hclt
c = random_hclt(5, [-1, 0, 1, 2, 2, 0, 5, 6, 6, 6], hidden=24, values=16, normalized=False)
x = np.random.default_rng(6).integers(0, 16, (500, 10))
words = c.encode(x)
assert np.array_equal(c.decode(words, 500), x)
print(hashlib.sha256(words.tobytes()).hexdigest())
"""


@pytest.mark.slow
def test_streams_are_the_same_bytes_under_every_blas_kernel_thread_count_and_simd_setting(tmp_path):
    from pathlib import Path

    from conftest import run_under_each_env

    script = tmp_path / "encode.py"
    script.write_text(ENCODE_IN_A_SUBPROCESS)
    outputs = run_under_each_env(script, Path(__file__).parent)
    c = random_hclt(5, [-1, 0, 1, 2, 2, 0, 5, 6, 6, 6], hidden=24, values=16, normalized=False)
    here = hashlib.sha256(c.encode(np.random.default_rng(6).integers(0, 16, (500, 10))).tobytes()).hexdigest()
    assert all(out == [here] for out in outputs), (here, outputs)


@pytest.mark.slow
def test_learned_on_digits_it_beats_a_per_pixel_frequency_model():
    from sklearn.datasets import load_digits

    from gqtok.training.circuit import CircuitConfig, learn_hclt

    x = load_digits().data.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    train, held = x[order[:1400]], x[order[1400:]]
    circuit, fit = learn_hclt(train, 17, CircuitConfig(hidden=8, em_steps=8), progress=False, heldout=held)
    history = fit["train_bits_per_variable"]
    assert history[-1] < history[0]  # EM improves the likelihood
    counts = np.stack([np.bincount(col, minlength=17) for col in train.T]) + 0.5
    frequency_bits = -np.log2((counts / counts.sum(axis=1, keepdims=True))[np.arange(64), held]).mean()
    words = circuit.encode(held)
    assert 32 * len(words) / held.size < frequency_bits - 0.2
    assert fit["heldout_bits_per_variable"] == pytest.approx(32 * len(words) / held.size, abs=0.01)
