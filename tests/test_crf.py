"""Dense CRF: output is a distribution, it cleans label noise along flat colour regions, and errors are clear."""

import sys

import numpy as np
import pytest
import torch

from apc_seg.crf import dense_crf


def two_region_problem(seed=0, height=24, width=32, flip_frac=0.25):
    """A red left half (class 0) and a blue right half (class 1), with a quarter of the pixels' probabilities
    flipped to favour the wrong class."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.uint8)
    image[:, : width // 2] = (200, 40, 40)
    image[:, width // 2 :] = (40, 40, 200)
    truth = np.zeros((height, width), np.int64)
    truth[:, width // 2 :] = 1
    p1 = np.where(truth == 1, 0.7, 0.3)
    p1 = np.where(rng.random((height, width)) < flip_frac, 1 - p1, p1)
    probs = np.stack([1 - p1, p1]).astype(np.float32)
    return image, probs, truth


def test_dense_crf_fixes_noisy_pixels():
    pytest.importorskip("pydensecrf.densecrf", reason='pydensecrf2 not installed (pip install "apc-seg[crf]")')
    image, probs, truth = two_region_problem()
    noisy_acc = (probs.argmax(0) == truth).mean()
    refined = dense_crf(image, probs)
    assert isinstance(refined, np.ndarray) and refined.dtype == np.float32 and refined.shape == probs.shape
    assert (refined >= 0).all() and np.allclose(refined.sum(0), 1.0, atol=1e-4)
    refined_acc = (refined.argmax(0) == truth).mean()
    assert noisy_acc < 0.8 and refined_acc > 0.97


def test_dense_crf_tensor_in_tensor_out_and_zero_iterations_keep_argmax():
    pytest.importorskip("pydensecrf.densecrf", reason='pydensecrf2 not installed (pip install "apc-seg[crf]")')
    image, probs, _ = two_region_problem(seed=1)
    refined = dense_crf(torch.from_numpy(image), torch.from_numpy(probs))
    assert isinstance(refined, torch.Tensor) and refined.dtype == torch.float32 and refined.shape == probs.shape
    # With no mean-field step the CRF only normalises exp(-unary) = probs, so nothing moves.
    unchanged = dense_crf(image, probs, iterations=0)
    np.testing.assert_allclose(unchanged, probs, atol=1e-5)


@pytest.mark.parametrize(
    "image, match",
    [
        (np.zeros((24, 31, 3), np.uint8), "H x W x 3"),
        (np.zeros((24, 32, 3), np.float32), "uint8"),
    ],
)
def test_dense_crf_rejects_mismatched_image(image, match):
    pytest.importorskip("pydensecrf.densecrf", reason='pydensecrf2 not installed (pip install "apc-seg[crf]")')
    _, probs, _ = two_region_problem()
    with pytest.raises(ValueError, match=match):
        dense_crf(image, probs)


def test_missing_pydensecrf_names_the_extra(monkeypatch):
    # A None entry in sys.modules makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    image, probs, _ = two_region_problem()
    with pytest.raises(ImportError, match=r'pip install "apc-seg\[crf\]"'):
        dense_crf(image, probs)
