"""The fast path (bf16 autocast, SDPA, fused AdamW) changes no result beyond bf16 tolerance (issue 7)."""

import pytest
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


@pytest.mark.parametrize("schedule", ["shifts", "gather"])
def test_training_step_makes_no_tensor_from_python_data_after_the_first(schedule, monkeypatch):
    # On a GPU a tensor made from Python numbers is a blocking host-to-device copy, which synchronises the device in
    # the middle of the step; constants such as PAR's neighbour index and offset distances are made once per run.
    from torch.utils._python_dispatch import TorchDispatchMode

    from apc_seg import pseudo_labels

    if schedule == "gather":  # PAR's GPU schedule, run here on the CPU
        monkeypatch.setattr(pseudo_labels, "_propagate_by_shifts", pseudo_labels._propagate_by_gather)

    class HostData(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.made = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            # Python scalars arrive as 0-dim tensors, which CUDA kernels take as arguments without a copy.
            if func in (torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default) and args[0].dim():
                self.made.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    pseudo_labels._offset_distances.cache_clear()
    pseudo_labels._neighbour_index.cache_clear()
    torch.manual_seed(0)
    model = APCForSemanticSegmentation(tiny_config(pseudo_label_max_classes=2)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    pixel_values, labels = torch.randn(2, 3, 32, 32), torch.tensor([[1.0, 1, 0], [1, 0, 1]])

    def step():
        model(pixel_values, class_labels=labels, use_seg_loss=True).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with HostData() as first:
        step()
    assert first.made, "the first step builds the constants (else this check could not fail)"
    with HostData() as steady:
        step()
    assert steady.made == []


def test_prefer_flash_attention_turns_off_cudnn_attention_on_a_gpu_only():
    from apc_seg.train import prefer_flash_attention

    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        prefer_flash_attention(torch.device("cpu"))
        assert torch.backends.cuda.cudnn_sdp_enabled()  # a CPU run leaves the process's settings alone
        prefer_flash_attention(torch.device("cuda", 0))
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
