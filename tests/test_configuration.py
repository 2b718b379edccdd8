import pytest

from apc_seg import APCConfig, VOC_CLASSES
from apc_seg.labels import COCO_CLASSES, id2label_for

from conftest import tiny_config


def test_defaults_are_the_papers_voc_setting():
    config = APCConfig()
    assert config.num_labels == 21 and config.id2label[0] == "background" and config.id2label[20] == "tvmonitor"
    assert config.label2id["person"] == VOC_CLASSES.index("person")
    assert (config.hidden_size, config.patch_size) == (768, 16)
    assert config.pooling == "adaptive_k" and config.akp_ratio == 0.7 and config.pcl_loss_weight == 0.1


def test_coco_labels_count_background():
    config = APCConfig(id2label=id2label_for("coco"))
    assert config.num_labels == 81 == len(COCO_CLASSES)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(akp_min_k=8, akp_max_k=4), "akp_min_k"),
        (dict(pooling="mean"), "pooling"),
        (dict(patch_mixer="transformer"), "patch_mixer"),
        (dict(backbone_stem="resnet"), "backbone_stem"),
        (dict(conv_stem_init="kaiming"), "conv_stem_init"),
        (dict(backbone_stem="conv", backbone_config=dict(hidden_size=32, num_attention_heads=2, patch_size=12)),
         "backbone_stem='conv' is invalid for patch_size=12"),
        (dict(pseudo_label_threshold=1.5), "pseudo_label_threshold"),
        (dict(pcl_high_threshold=-0.1), "pcl_high_threshold"),
        (dict(akp_ratio=2.0), "akp_ratio"),
        (dict(pcl_low_threshold=0.9, pcl_high_threshold=0.8), "pcl_low_threshold"),
        (dict(pseudo_label_refine="crf"), "pseudo_label_refine"),
        (dict(top_k_patches=0), "top_k_patches"),
        (dict(id2label={0: "background"}), "num_labels"),
    ],
)
def test_invalid_fields_raise_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_hidden_size_must_suit_the_mixer():
    backbone = dict(hidden_size=30, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8, patch_size=8)
    with pytest.raises(ValueError, match="hidden_size=30.*multiple of 4"):
        APCConfig(backbone_config=backbone)
    assert APCConfig(backbone_config=backbone, patch_mixer="none").hidden_size == 30


def test_config_round_trips(tmp_path):
    config = tiny_config(akp_ratio=0.6, pooling="topk", par_dilations=[1, 2])
    config.save_pretrained(tmp_path)
    loaded = APCConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.backbone_config.hidden_size == 32 and loaded.id2label == config.id2label
