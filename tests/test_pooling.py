"""Adaptive-K Pooling and the other pooling rules (spec section 3)."""

import torch

from apc_seg.modeling_apc import adaptive_k_pool, pool_patch_scores

from conftest import tiny_config


def _distinct_scores(b=3, c=4, n=50):
    return torch.rand(b, c, n) * 0.98 + torch.arange(n) * 1e-4  # distinct with probability 1, in [0, 1)


def test_ratio_one_with_distinct_scores_is_max_pooling():
    scores = _distinct_scores()
    pooled, k = adaptive_k_pool(scores, ratio=1.0, min_k=1, max_k=16)
    assert torch.equal(k, torch.ones_like(k))
    torch.testing.assert_close(pooled, scores.amax(dim=-1))


def test_fixed_k_is_top_k_mean():
    scores = _distinct_scores()
    pooled, k = adaptive_k_pool(scores, ratio=0.7, min_k=5, max_k=5)
    assert (k == 5).all()
    torch.testing.assert_close(pooled, scores.topk(5, dim=-1).values.mean(-1))


def test_k_stays_within_bounds_and_counts_patches_near_the_best():
    scores = torch.tensor([[[1.0, 0.9, 0.8, 0.75, 0.1, 0.0], [0.5, 0.1, 0.1, 0.1, 0.1, 0.1], [1.0] * 6]])
    pooled, k = adaptive_k_pool(scores, ratio=0.7, min_k=2, max_k=4)
    assert k.tolist() == [[4, 2, 4]]  # 4 above 0.7 (capped at 4); 1 -> raised to min 2; 6 -> capped at 4
    torch.testing.assert_close(pooled[0, 1], torch.tensor(0.3))
    random_k = adaptive_k_pool(torch.rand(4, 5, 100), ratio=0.3, min_k=3, max_k=9)[1]
    assert random_k.min() >= 3 and random_k.max() <= 9


def test_gradient_reaches_exactly_the_selected_patches():
    scores = torch.tensor([[[0.9, 0.1, 0.8, 0.2, 0.7, 0.05]]], requires_grad=True)
    pooled, k = adaptive_k_pool(scores, ratio=0.7, min_k=1, max_k=16)
    assert k.item() == 3  # 0.9, 0.8, 0.7 are within 0.7 * 0.9
    pooled.sum().backward()
    expected = torch.tensor([[[1 / 3, 0, 1 / 3, 0, 1 / 3, 0]]])
    torch.testing.assert_close(scores.grad, expected)


def test_a_single_outlier_patch_cannot_set_the_image_score():
    # One abnormal patch at 0.95 among 143 low ones: max pooling calls the class present, AKP with a floor of K
    # averages it with the next best patches and keeps the class absent. With an object (many high patches) AKP
    # still calls it present.
    outlier = torch.full((1, 1, 144), 0.05)
    outlier[0, 0, 77] = 0.95
    obj = torch.full((1, 1, 144), 0.05)
    obj[0, 0, :20] = torch.linspace(0.95, 0.7, 20)
    max_config = tiny_config(pooling="max")
    akp_config = tiny_config(pooling="adaptive_k", akp_min_k=4, akp_max_k=16)
    assert pool_patch_scores(outlier, max_config).item() > 0.9
    assert pool_patch_scores(outlier, akp_config).item() < 0.5
    assert pool_patch_scores(obj, akp_config).item() > 0.8


def test_topk_and_max_rules():
    scores = _distinct_scores()
    torch.testing.assert_close(pool_patch_scores(scores, tiny_config(pooling="max")), scores.amax(-1))
    topk = pool_patch_scores(scores, tiny_config(pooling="topk", top_k_patches=4))
    torch.testing.assert_close(topk, scores.topk(4, dim=-1).values.mean(-1))
