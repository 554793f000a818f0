"""The quality study's BBC training head (benchmarks/quality/bbc.py ``train_and_score``) on a
few rows: a budgeted selection's class counts are not a prior. Synthetic features shaped like
the study's (unit-norm, 384 dims, within-topic cosine ~0.14, across ~0): six training rows, one
per topic plus a second of one topic, must classify a balanced test set by its features, not
send it to the doubled topic (the head with an intercept did: 22% accuracy, 98% of the
predictions on that topic)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "quality"))
sys.path.insert(0, str(ROOT / "python"))
if importlib.util.find_spec("matplotlib") is None:
    pytest.skip("the quality study's helpers need matplotlib", allow_module_level=True)
bbc = pytest.importorskip("bbc")


def _topic_features(rng: np.random.Generator, topics: np.ndarray, centres: np.ndarray) -> np.ndarray:
    rows = 0.4 * centres[topics] + rng.standard_normal((len(topics), centres.shape[1])) / np.sqrt(centres.shape[1])
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_few_rows_with_one_topic_twice_do_not_collapse_onto_it(seed):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((5, 384))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    train_y = np.asarray([0, 1, 2, 3, 4, 4])
    test_y = np.repeat(np.arange(5), 40)
    accuracy = bbc.train_and_score(_topic_features(rng, train_y, centres), train_y,
                                   _topic_features(rng, test_y, centres), test_y, c=bbc.FULL.head_c)
    # nearest centroid on the same rows scores ~0.9; a head that predicts the doubled topic, 0.2
    assert accuracy >= 0.7, accuracy


def test_one_topic_predicts_it():
    x = np.eye(3, 8, dtype=np.float32)
    assert bbc.train_and_score(x, np.asarray([2, 2, 2]), x, np.asarray([2, 0, 2]), c=10.0) == pytest.approx(2 / 3)
