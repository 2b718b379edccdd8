"""PCL, pseudo-labels, PAR and the decoder loss (spec section 3)."""

import pytest
import torch

from apc_seg import APCForSemanticSegmentation
from apc_seg.labels import IGNORE_INDEX
from apc_seg.modeling_apc import decoder_loss, patch_contrastive_loss
from apc_seg.pseudo_labels import make_pseudo_labels, mask_absent_classes, par_refine

from conftest import tiny_config


def _confident_probs(assigned: torch.Tensor, num_classes: int, confidence: float = 0.95) -> torch.Tensor:
    """(B, N) class ids -> (B, C, N) probabilities with `confidence` on the assigned class."""
    probs = torch.full((*assigned.shape, num_classes), (1 - confidence) / (num_classes - 1))
    probs.scatter_(-1, assigned.unsqueeze(-1), confidence)
    return probs.transpose(1, 2)


def test_pcl_is_exactly_zero_without_pairs():
    emb = torch.randn(2, 30, 16, requires_grad=True)
    uncertain = torch.full((2, 3, 30), 1 / 3)  # masked -> 1/3 or 1/2: never high, so no pair of any kind
    labels = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    loss = patch_contrastive_loss(emb, uncertain, labels, high_threshold=0.8, low_threshold=0.4)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert torch.isfinite(emb.grad).all()


def test_pcl_is_lower_for_clustered_than_shuffled_embeddings():
    n, dim = 64, 16
    assigned = torch.randint(0, 3, (1, n))
    centres = torch.nn.functional.normalize(torch.randn(3, dim), dim=-1)
    clustered = (centres[assigned] + 0.05 * torch.randn(1, n, dim))
    shuffled = clustered[:, torch.randperm(n)]
    probs = _confident_probs(assigned, 3)
    labels = torch.ones(1, 3)
    loss_clustered = patch_contrastive_loss(clustered, probs, labels)
    loss_shuffled = patch_contrastive_loss(shuffled, probs, labels)
    assert loss_clustered < 0.5 * loss_shuffled


def test_pcl_ignores_absent_classes_when_assigning():
    # Patches confident for class 2 in an image labelled {background, 1}: masking makes them background or class 1.
    probs = _confident_probs(torch.full((1, 10), 2), 3, confidence=0.9)
    masked = mask_absent_classes(probs, torch.tensor([[1.0, 1, 0]]))
    assert masked[:, 2].abs().max() == 0
    torch.testing.assert_close(masked.sum(1), torch.ones(1, 10))


def test_pcl_memory_is_bounded_by_max_patches():
    # A 200x200 grid: the full pair matrix would be 40,000^2 floats (6.4 GB). Only a subset of at most
    # `max_patches` patches per image may enter the loss, which shows in the gradient.
    n = 40_000
    emb = torch.randn(1, n, 8, requires_grad=True)
    probs = _confident_probs(torch.randint(0, 2, (1, n)), 2)
    loss = patch_contrastive_loss(emb, probs, torch.ones(1, 2), max_patches=64)
    loss.backward()
    touched = (emb.grad.abs().sum(-1) > 0).sum().item()
    assert 0 < touched <= 64


def test_pseudo_labels_never_contain_absent_classes():
    probs = torch.rand(4, 5, 6, 6).softmax(dim=1)
    labels = torch.tensor([[1.0, 1, 0, 0, 0], [1, 0, 0, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    image = torch.randn(4, 3, 48, 48)
    for refine in ("par", "none"):
        pseudo = make_pseudo_labels(probs, labels, image, threshold=0.0, refine=refine)
        assert pseudo.shape == (4, 48, 48)
        for b in range(4):
            allowed = set(labels[b].nonzero().flatten().tolist()) | {IGNORE_INDEX}
            assert set(pseudo[b].unique().tolist()) <= allowed


def test_low_confidence_pixels_are_ignored():
    probs = torch.full((1, 3, 4, 4), 1 / 3)  # three equally likely present classes: winner has 1/3
    pseudo = make_pseudo_labels(probs, torch.ones(1, 3), torch.randn(1, 3, 32, 32), threshold=0.5, refine="none")
    assert (pseudo == IGNORE_INDEX).all()
    confident = torch.zeros(1, 3, 4, 4)
    confident[:, 1] = 1.0
    pseudo = make_pseudo_labels(confident, torch.ones(1, 3), torch.randn(1, 3, 32, 32), threshold=0.5, refine="par")
    assert (pseudo == 1).all()


def test_par_keeps_shape_class_set_and_follows_image_edges():
    image = torch.zeros(1, 3, 32, 32)
    image[..., 16:] = 1.0  # left dark, right bright
    probs = torch.zeros(1, 4, 32, 32)
    probs[:, 0, :, :14] = 1.0
    probs[:, 2, :, 14:] = 1.0  # class 2 leaks 2 columns into the dark half
    refined = par_refine(image, probs)
    assert refined.shape == probs.shape
    assert refined[:, [1, 3]].abs().max() == 0  # absent classes stay absent
    torch.testing.assert_close(refined.sum(1), torch.ones(1, 32, 32))
    # The leaked columns move towards background, the colour of their side, and the interior keeps its label.
    assert (refined[0, 0, :, 14:16] > probs[0, 0, :, 14:16]).all()
    assert (refined.argmax(1)[0, :, 20:] == 2).all() and (refined.argmax(1)[0, :, :10] == 0).all()


def test_all_ignored_batch_gives_zero_decoder_loss():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = decoder_loss(logits, torch.full((2, 32, 32), IGNORE_INDEX))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("autocast", [False, True])
def test_every_loss_term_is_finite(autocast):
    model = APCForSemanticSegmentation(tiny_config(pcl_high_threshold=0.0, pcl_low_threshold=0.0))
    pixel_values = torch.randn(2, 3, 32, 48)
    labels = torch.tensor([[1.0, 1, 0], [1, 1, 1]])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(pixel_values, class_labels=labels)
    assert set(out.loss_terms) == {"cls", "pcl", "seg"}
    for name, term in out.loss_terms.items():
        assert torch.isfinite(term), name
    assert out.loss_terms["pcl"] > 0 and out.loss_terms["seg"] > 0  # thresholds 0: every patch pairs
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.vit.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0


def test_seg_loss_switch_and_pseudo_labels_method():
    model = APCForSemanticSegmentation(tiny_config()).eval()
    pixel_values, labels = torch.randn(1, 3, 32, 32), torch.tensor([[1.0, 0, 1]])
    assert model(pixel_values, class_labels=labels, use_seg_loss=False).loss_terms["seg"] == 0
    pseudo = model.pseudo_labels(pixel_values, labels)
    assert pseudo.shape == (1, 32, 32) and set(pseudo.unique().tolist()) <= {0, 2, IGNORE_INDEX}
    with pytest.raises(ValueError, match="num_labels=3"):
        model(pixel_values, class_labels=torch.ones(1, 5))


@pytest.mark.parametrize("refine", ["par", "none"])
def test_pseudo_labels_on_present_classes_only_are_exact(refine):
    probs = torch.rand(4, 21, 6, 6).softmax(dim=1)
    labels = torch.zeros(4, 21)
    labels[:, 0] = 1
    labels[0, [3, 15]] = 1
    labels[1, [20]] = 1
    labels[3, [1, 2, 7, 19]] = 1  # 5 classes with background: the most in this batch
    image = torch.randn(4, 3, 48, 48)
    full = make_pseudo_labels(probs, labels, image, threshold=0.3, refine=refine)
    compact = make_pseudo_labels(probs, labels, image, threshold=0.3, refine=refine, max_classes=5)
    assert torch.equal(full, compact)
    assert set(compact[3].unique().tolist()) - {IGNORE_INDEX} <= {0, 1, 2, 7, 19}


def test_pseudo_labels_refuse_an_image_with_more_classes_than_max_classes():
    labels = torch.ones(1, 6)
    with pytest.raises(RuntimeError):
        make_pseudo_labels(torch.rand(1, 6, 4, 4).softmax(1), labels, torch.randn(1, 3, 32, 32), max_classes=3)


@pytest.mark.parametrize("schedule", ["shifts", "gather", "gather_in_chunks"])
def test_par_equals_the_offset_by_offset_definition(schedule, monkeypatch):
    # ToCo's PAR written one neighbour offset at a time. par_refine runs the propagation as a loop of fused
    # multiply-adds on a CPU and as one gather per chunk of offsets on a GPU; both are checked here on the CPU.
    from apc_seg import pseudo_labels
    from apc_seg.pseudo_labels import _neighbour_offsets

    if schedule != "shifts":
        monkeypatch.setattr(pseudo_labels, "_propagate_by_shifts", pseudo_labels._propagate_by_gather)
    if schedule == "gather_in_chunks":  # 5 offsets per chunk: 24 offsets in 5 chunks, the last one short
        monkeypatch.setattr(pseudo_labels, "_GATHER_CHUNK_ELEMENTS", 5 * 2 * 3 * 20 * 24)

    torch.manual_seed(0)
    image, probs = torch.randn(2, 3, 20, 24), torch.rand(2, 3, 20, 24).softmax(dim=1)
    dilations, iterations, w1, w2 = (1, 2, 4), 4, 0.3, 0.01
    offsets = _neighbour_offsets(dilations)
    pad = max(dilations)
    padded_image = torch.nn.functional.pad(image, [pad] * 4, mode="replicate")
    neighbours = torch.stack([padded_image[..., pad + dy: pad + dy + 20, pad + dx: pad + dx + 24]
                              for dy, dx, _ in offsets], dim=2)
    colour = -(((neighbours - image.unsqueeze(2)).abs() / (neighbours.std(dim=2, keepdim=True) + 1e-8) / w1) ** 2)
    distance = torch.tensor([o[2] for o in offsets])
    position = -((distance / (distance.std() + 1e-8) / w1) ** 2)
    affinity = colour.mean(dim=1, keepdim=True).softmax(dim=2) + w2 * position.softmax(dim=0).view(1, 1, -1, 1, 1)
    expected = probs
    for _ in range(iterations):
        padded = torch.nn.functional.pad(expected, [pad] * 4, mode="replicate")
        expected = sum(padded[..., pad + dy: pad + dy + 20, pad + dx: pad + dx + 24] * affinity[:, :, k]
                       for k, (dy, dx, _) in enumerate(offsets))
    expected = expected / expected.sum(dim=1, keepdim=True)
    torch.testing.assert_close(par_refine(image, probs, dilations, iterations, w1, w2), expected)


@pytest.mark.parametrize("in_size,out_size", [(12, 96), (28, 448), (7, 50), (5, 5), (9, 4)])
def test_upsampling_matrix_equals_bilinear_interpolation(in_size, out_size):
    from apc_seg.modeling_apc import bilinear_upsampling_matrix

    x = torch.randn(2, 3, in_size, in_size + 3, dtype=torch.float64)
    expected = torch.nn.functional.interpolate(x, size=(out_size, out_size + 1), mode="bilinear", align_corners=False)
    rows = bilinear_upsampling_matrix(in_size, out_size, dtype=torch.float64)
    cols = bilinear_upsampling_matrix(in_size + 3, out_size + 1, dtype=torch.float64)
    torch.testing.assert_close(rows @ x @ cols.T, expected)


def test_upsampling_matrix_in_float32_matches_float32_interpolation():
    from apc_seg.modeling_apc import bilinear_upsampling_matrix

    x = torch.randn(2, 4, 28, 28)
    expected = torch.nn.functional.interpolate(x, size=(448, 448), mode="bilinear", align_corners=False)
    matrix = bilinear_upsampling_matrix(28, 448)
    assert matrix.dtype == torch.float32
    torch.testing.assert_close(matrix @ x @ matrix.T, expected)
