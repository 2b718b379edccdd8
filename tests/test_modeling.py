"""The model as users load, save and call it (spec sections 2-4)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModelForSemanticSegmentation, ViTConfig, ViTModel, pipeline

from apc_seg import APCConfig, APCForSemanticSegmentation, APCImageProcessor, APCSemanticSegmenterOutput

from conftest import TINY_BACKBONE, tiny_config


def test_import_pulls_no_torchvision_or_timm():
    code = "import sys, apc_seg, apc_seg.modeling_apc; print(sorted(m for m in ('torchvision', 'timm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_output_shapes(config):
    model = APCForSemanticSegmentation(config).eval()
    out = model(torch.randn(2, 3, 40, 56), output_hidden_states=True)
    assert isinstance(out, APCSemanticSegmenterOutput) and out.loss is None
    assert out.logits.shape == out.patch_logits.shape == (2, 3, 5, 7)
    assert out.image_scores.shape == (2, 3) and ((0 <= out.image_scores) & (out.image_scores <= 1)).all()
    assert len(out.hidden_states) == 3 and out.hidden_states[-1].shape == (2, 1 + 35, 32)
    as_tuple = model(torch.randn(2, 3, 40, 56), return_dict=False)
    assert len(as_tuple) == 3 and as_tuple[0].shape == (2, 3, 5, 7)


@pytest.mark.parametrize("size", [(8, 8), (32, 32), (24, 64), (72, 40)])
def test_any_multiple_of_the_patch_size_works(config, size):
    model = APCForSemanticSegmentation(config).eval()
    out = model(torch.randn(1, 3, *size), class_labels=torch.tensor([[1.0, 1, 0]]))
    assert out.logits.shape[-2:] == (size[0] // 8, size[1] // 8) and torch.isfinite(out.loss)


def test_other_sizes_give_a_clear_error_and_the_processor_handles_them(config):
    model = APCForSemanticSegmentation(config).eval()
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        model(torch.randn(1, 3, 30, 33))
    processor = APCImageProcessor(size={"height": 32, "width": 32})
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 33, 3), dtype=np.uint8))
    inputs = processor(images=image, return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)
    assert model(**inputs).logits.shape == (1, 3, 4, 4)


def test_sdpa_and_eager_attention_agree(config):
    sdpa = APCForSemanticSegmentation(config).eval()
    eager_config = APCConfig.from_dict(config.to_dict())
    eager_config._attn_implementation = "eager"
    eager = APCForSemanticSegmentation(eager_config).eval()
    eager.load_state_dict(sdpa.state_dict())
    assert sdpa.vit.config._attn_implementation == "sdpa" and eager.vit.config._attn_implementation == "eager"
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(sdpa(x).logits, eager(x).logits, atol=1e-5, rtol=1e-4)


def test_save_and_load_round_trip_exactly(tmp_path, config):
    model = APCForSemanticSegmentation(config).eval()
    model.save_pretrained(tmp_path)
    APCImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["config.json", "model.safetensors", "preprocessor_config.json"]
    x = torch.randn(2, 3, 32, 48)
    reference = model(x)
    for loaded in (APCForSemanticSegmentation.from_pretrained(tmp_path), AutoModelForSemanticSegmentation.from_pretrained(tmp_path)):
        assert isinstance(loaded, APCForSemanticSegmentation)
        out = loaded.eval()(x)
        assert torch.equal(out.logits, reference.logits) and torch.equal(out.image_scores, reference.image_scores)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), APCConfig)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(processor) is APCImageProcessor and processor.size["height"] == 32
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["image_processor_type"] == "APCImageProcessor"


def test_pipeline_returns_masks_with_the_right_labels(tmp_path, config):
    model = APCForSemanticSegmentation(config).eval()
    with torch.no_grad():  # make "dog" win everywhere, so the pipeline must report exactly background-free "dog"
        model.decoder.classifier.bias.copy_(torch.tensor([0.0, 0.0, 50.0]))
    model.save_pretrained(tmp_path)
    APCImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    segmenter = pipeline("image-segmentation", model=str(tmp_path))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (45, 61, 3), dtype=np.uint8))
    result = segmenter(image)
    assert [r["label"] for r in result] == ["dog"]
    assert result[0]["mask"].size == (61, 45) and np.asarray(result[0]["mask"]).min() == 255


def test_post_process_resizes_to_target(config):
    model = APCForSemanticSegmentation(config).eval()
    processor = APCImageProcessor(size={"height": 32, "width": 32})
    image = Image.fromarray(np.zeros((45, 61, 3), dtype=np.uint8))
    out = model(**processor(images=[image, image], return_tensors="pt"))
    masks = processor.post_process_semantic_segmentation(out, target_sizes=[(45, 61), (20, 10)])
    assert masks[0].shape == (45, 61) and masks[1].shape == (20, 10) and masks[0].max() < 3


def test_from_pretrained_backbone_loads_every_vit_weight(tmp_path):
    vit = ViTModel(ViTConfig(**TINY_BACKBONE), add_pooling_layer=False)
    vit.save_pretrained(tmp_path)
    model = APCForSemanticSegmentation.from_pretrained_backbone(str(tmp_path), config=tiny_config())
    info = model.backbone_loading_info
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert set(info["new_modules"]) == {"mixer", "classifier", "decoder"}
    for name, tensor in vit.state_dict().items():
        assert torch.equal(model.vit.state_dict()[name], tensor), name


def test_conv_stem_replaces_the_patch_embedding_trains_and_round_trips(tmp_path):
    from apc_seg.modeling_apc import APCConvStem

    torch.manual_seed(0)
    model = APCForSemanticSegmentation(tiny_config(backbone_stem="conv"))
    stem = model.vit.embeddings.patch_embeddings.projection
    assert isinstance(stem, APCConvStem)
    strides = [m.stride for m in stem.layers if isinstance(m, torch.nn.Conv2d)]
    assert strides == [(2, 2)] * 3  # patch 8 = three stride-2 stages
    out = model(torch.randn(4, 3, 40, 56), class_labels=torch.tensor([[1.0, 1, 0]] * 4))
    assert out.logits.shape == (4, 3, 5, 7) and torch.isfinite(out.loss)
    out.loss.backward()
    assert stem.layers[0].weight.grad.abs().sum() > 0 and stem.projection.weight.grad.abs().sum() > 0
    assert stem.layers[1].num_batches_tracked == 1  # BatchNorm statistics are updated in training mode

    model.eval().save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["backbone_stem"] == "conv"
    x = torch.randn(2, 3, 32, 48)
    loaded = APCForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.vit.embeddings.patch_embeddings.projection, APCConvStem)
    assert torch.equal(loaded(x).logits, model(x).logits)  # running statistics travel with the weights


def test_conv_stem_convolutions_are_he_initialised():
    # BatchNorm follows each conv, so a small init (ViT's std 0.02) means a large relative Adam step; the stem must
    # get ResNet-style He init (std sqrt(2 / fan_out)) although transformers initialises it as part of the ViT.
    torch.manual_seed(0)
    stem = APCForSemanticSegmentation(tiny_config(backbone_stem="conv")).vit.embeddings.patch_embeddings.projection
    convs = [m for m in stem.layers if isinstance(m, torch.nn.Conv2d)]
    for conv in convs:
        expected = (2.0 / (conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1])) ** 0.5
        assert abs(conv.weight.std().item() / expected - 1) < 0.15, (conv, conv.weight.std().item(), expected)
    assert abs(stem.projection.weight.std().item() - 0.02) < 0.005  # the projection keeps ViT's init
    # conv_stem_init="vit" keeps ViT's std 0.02 (the earlier benchmarks' stem).
    vit_init = APCForSemanticSegmentation(tiny_config(backbone_stem="conv", conv_stem_init="vit"))
    assert abs(vit_init.vit.embeddings.patch_embeddings.projection.layers[0].weight.std().item() - 0.02) < 0.005


def test_from_pretrained_backbone_refuses_a_conv_stem(tmp_path):
    ViTModel(ViTConfig(**TINY_BACKBONE), add_pooling_layer=False).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="backbone_stem='patch'"):
        APCForSemanticSegmentation.from_pretrained_backbone(str(tmp_path), config=tiny_config(backbone_stem="conv"))


def test_from_pretrained_backbone_takes_the_checkpoints_vit_config(tmp_path):
    backbone = dict(TINY_BACKBONE, hidden_size=48, num_attention_heads=4)
    ViTModel(ViTConfig(**backbone), add_pooling_layer=False).save_pretrained(tmp_path)
    model = APCForSemanticSegmentation.from_pretrained_backbone(str(tmp_path), config=tiny_config())
    assert model.config.hidden_size == 48 and model.classifier.in_features == 48


def test_new_modules_are_initialised_when_loading_a_checkpoint_without_them(tmp_path, config):
    # Weights missing from a checkpoint get _init_weights, not uninitialised memory (transformers builds on meta).
    model = APCForSemanticSegmentation(config)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("mixer.")}
    from safetensors.torch import save_file
    config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    loaded = APCForSemanticSegmentation.from_pretrained(tmp_path)
    for name, p in loaded.mixer.named_parameters():
        assert torch.isfinite(p).all() and p.abs().max() < 10, name
        assert p.abs().sum() > 0 or "bias" in name, name


def test_processor_and_inference_on_real_voc_photos(config):
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1].parent / "shared" / "realdata" / "voc" / "JPEGImages"
    if not folder.is_dir():
        pytest.skip(f"real VOC samples not found at {folder}")
    model = APCForSemanticSegmentation(config).eval()
    processor = APCImageProcessor(size={"height": 64, "width": 64})
    images = [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.jpg"))]
    assert len(images) == 7 and len({im.size for im in images}) > 1
    with torch.no_grad():
        out = model(**processor(images=images, return_tensors="pt"))
    masks = processor.post_process_semantic_segmentation(out, target_sizes=[im.size[::-1] for im in images])
    assert [tuple(m.shape) for m in masks] == [im.size[::-1] for im in images]


def test_position_embeddings_resized_once_give_the_same_outputs(tmp_path):
    vit = ViTModel(ViTConfig(**TINY_BACKBONE), add_pooling_layer=False)  # image_size 32
    vit.save_pretrained(tmp_path)
    on_the_fly = APCForSemanticSegmentation.from_pretrained_backbone(str(tmp_path), config=tiny_config()).eval()
    resized = APCForSemanticSegmentation.from_pretrained_backbone(str(tmp_path), config=tiny_config(),
                                                                  image_size=64).eval()
    assert resized.vit.embeddings.position_embeddings.shape == (1, 1 + 64, 32)
    assert resized.config.backbone_config.image_size == 64
    resized.load_state_dict({k: v for k, v in on_the_fly.state_dict().items() if "position_embeddings" not in k},
                            strict=False)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(resized(x).logits, on_the_fly(x).logits, atol=1e-5, rtol=1e-4)
    assert resized(torch.randn(1, 3, 32, 48)).logits.shape == (1, 3, 4, 6)  # other sizes still interpolate
