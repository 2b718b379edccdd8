"""The fast path (bf16 autocast, SDPA, fused AdamW) changes no result beyond bf16 tolerance (issue 7)."""

import torch

from apc_seg import APCConfig, APCForSemanticSegmentation

from conftest import tiny_config


def _pair():
    fast = APCForSemanticSegmentation(tiny_config(pcl_high_threshold=0.3, pcl_low_threshold=0.2)).eval()
    reference_config = APCConfig.from_dict(fast.config.to_dict())
    reference_config._attn_implementation = "eager"
    reference = APCForSemanticSegmentation(reference_config).eval()
    reference.load_state_dict(fast.state_dict())
    return fast, reference


def test_bf16_sdpa_losses_match_fp32_eager_within_bf16_tolerance():
    fast, reference = _pair()
    pixel_values = torch.randn(2, 3, 48, 48)
    labels = torch.tensor([[1.0, 1, 0], [1, 1, 1]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast_out = fast(pixel_values, class_labels=labels)
    ref_out = reference(pixel_values, class_labels=labels)
    for name in ("cls", "pcl", "seg"):
        torch.testing.assert_close(fast_out.loss_terms[name].float(), ref_out.loss_terms[name], rtol=3e-2, atol=3e-3,
                                   msg=name)
    torch.testing.assert_close(fast_out.image_scores.float(), ref_out.image_scores, rtol=3e-2, atol=3e-3)


def test_fused_adamw_step_matches_the_for_loop_step():
    fast = APCForSemanticSegmentation(tiny_config()).eval()
    reference = APCForSemanticSegmentation(tiny_config()).eval()
    reference.load_state_dict(fast.state_dict())
    pixel_values, labels = torch.randn(2, 3, 32, 32), torch.tensor([[1.0, 1, 0], [1, 0, 1]])
    optimizers = [torch.optim.AdamW(fast.parameters(), lr=1e-3, fused=True),
                  torch.optim.AdamW(reference.parameters(), lr=1e-3, foreach=False)]
    for model, optimizer in zip((fast, reference), optimizers):
        model(pixel_values, class_labels=labels).loss.backward()
        optimizer.step()
    for (name, a), b in zip(fast.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
