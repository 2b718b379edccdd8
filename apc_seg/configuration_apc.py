"""APC model configuration."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig, ViTConfig

from .labels import VOC_CLASSES

POOLING_CHOICES = ("adaptive_k", "topk", "max")
PATCH_MIXER_CHOICES = ("hv_bilstm", "none")
BACKBONE_STEM_CHOICES = ("patch", "conv")
CONV_STEM_INIT_CHOICES = ("he", "vit")
PSEUDO_LABEL_REFINE_CHOICES = ("par", "none")


class APCConfig(PretrainedConfig):
    r"""
    Configuration of [`APCForSemanticSegmentation`]: a ViT backbone, a patch mixer, a patch classifier pooled into
    image scores, patch contrastive learning, and a LargeFOV decoder trained on online pseudo-labels.

    Defaults reproduce the APC paper's VOC setting (ViT-B/16, 21 labels). `num_labels` counts background, which is
    always label 0.

    Args:
        backbone_config (`dict` or [`ViTConfig`], *optional*):
            Configuration of the ViT backbone. Defaults to ViT-B/16 (hidden 768, 12 layers, 12 heads, image 224).
        backbone_stem (`str`, *optional*, defaults to `"patch"`):
            How the backbone turns pixels into patch tokens. `"patch"`: ViT's own linear patch embedding (what every
            pretrained ViT has). `"conv"`: a convolutional stem in its place (log2(patch_size) 3x3 stride-2
            conv + BatchNorm + ReLU stages and a 1x1 projection; Xiao et al., NeurIPS 2021), for backbones trained
            from scratch: it gives the patch tokens local texture features from the first step (the synthetic
            recipe uses it; docs/method.md). The patch size must be a power of two.
        conv_stem_init (`str`, *optional*, defaults to `"he"`):
            Initialisation of the `"conv"` stem's convolutions. `"he"`: He normal (fan_out), as ResNets. `"vit"`:
            ViT's truncated normal with std `initializer_range` (0.02), what they get as part of the ViT; kept to
            reproduce the earlier benchmarks: each conv is followed by BatchNorm, so with std 0.02 Adam's steps are
            large relative to the weights, and in 1 seed of 8 the synthetic recipe never learned its image labels
            (docs/benchmarks.md). Only used for a model built from a config; loaded weights are kept.
        patch_mixer (`str`, *optional*, defaults to `"hv_bilstm"`):
            `"hv_bilstm"`: ViT-PCM's mixer, one BiLSTM along the rows and one along the columns of the patch grid,
            each with `hidden_size // 4` units per direction, concatenated back to `hidden_size`. `"none"`: identity.
        mixer_dropout (`float`, *optional*, defaults to 0.2):
            Dropout on the patch tokens before the mixer.
        classifier_dropout (`float`, *optional*, defaults to 0.2):
            Dropout before the bias-free linear patch classifier.
        pooling (`str`, *optional*, defaults to `"adaptive_k"`):
            How patch scores become image scores: `"max"` (ViT-PCM), `"topk"` (mean of the `top_k_patches` best patches) or
            `"adaptive_k"` (AKP: the mean of the K best, K counting the patches within `akp_ratio` of the best).
        top_k_patches (`int`, *optional*, defaults to 4): K of `"topk"` pooling. (The spec calls it `top_k`; that name
            is reserved by transformers for generation, which refuses to save a config carrying it.)
        akp_ratio (`float`, *optional*, defaults to 0.7): a patch counts towards K when its score is at least
            `akp_ratio` times the class's best patch score.
        akp_min_k (`int`, *optional*, defaults to 1), akp_max_k (`int`, *optional*, defaults to 16): bounds on K.
        cls_loss_weight (`float`, *optional*, defaults to 1.0): weight of the image-level BCE.
        pcl_loss_weight (`float`, *optional*, defaults to 0.1): weight of patch contrastive learning; 0 disables it.
        pcl_high_threshold (`float`, *optional*, defaults to 0.8), pcl_low_threshold (`float`, *optional*, defaults
            to 0.4): a patch is confident when its (label-masked) winning probability is at least the high
            threshold, and uncertain when it is below the low one.
        pcl_push_low (`bool`, *optional*, defaults to `True`): also push uncertain patches away from confident ones.
        pcl_margin (`float`, *optional*, defaults to 0.0): negative pairs are penalised by `relu(cos - margin)`.
        pcl_max_patches (`int`, *optional*, defaults to 256): at most this many patches per image enter PCL (a
            random subset), so its pairwise matrix stays bounded in memory.
        decoder_hidden_size (`int`, *optional*, defaults to 256), decoder_dilation (`int`, *optional*, defaults to
            5): the LargeFOV decoder's width and dilation.
        seg_loss_weight (`float`, *optional*, defaults to 0.1): weight of the decoder's cross-entropy on
            pseudo-labels.
        pseudo_label_threshold (`float`, *optional*, defaults to 0.5): pixels whose winning pseudo-label
            probability is below this are ignored (255).
        pseudo_label_refine (`str`, *optional*, defaults to `"par"`): `"par"` refines pseudo-labels with ToCo's
            pixel-adaptive refinement on the image; `"none"` skips it.
        pseudo_label_max_classes (`int`, *optional*):
            The most classes (background included) any training image holds. When set, pseudo-labels and PAR are
            computed on that many channels instead of `num_labels` (exact, and much cheaper on VOC/COCO; `apc-train`
            sets it from the training split). `None` uses all channels.
        par_dilations (`list[int]`), par_iterations (`int`), par_w1 (`float`), par_w2 (`float`), par_scale
            (`float`): PAR's neighbourhood dilations [1, 2, 4, 8, 12, 24], iterations [10], colour and position
            temperatures [0.3, 0.01], and the resolution it runs at relative to the crop [0.5].
    """

    model_type = "apc"
    sub_configs = {"backbone_config": ViTConfig}

    def __init__(
        self,
        backbone_config: dict | ViTConfig | None = None,
        backbone_stem: str = "patch",
        conv_stem_init: str = "he",
        patch_mixer: str = "hv_bilstm",
        mixer_dropout: float = 0.2,
        classifier_dropout: float = 0.2,
        pooling: str = "adaptive_k",
        top_k_patches: int = 4,
        akp_ratio: float = 0.7,
        akp_min_k: int = 1,
        akp_max_k: int = 16,
        cls_loss_weight: float = 1.0,
        pcl_loss_weight: float = 0.1,
        pcl_high_threshold: float = 0.8,
        pcl_low_threshold: float = 0.4,
        pcl_push_low: bool = True,
        pcl_margin: float = 0.0,
        pcl_max_patches: int = 256,
        decoder_hidden_size: int = 256,
        decoder_dilation: int = 5,
        seg_loss_weight: float = 0.1,
        pseudo_label_threshold: float = 0.5,
        pseudo_label_refine: str = "par",
        pseudo_label_max_classes: int | None = None,
        par_dilations: list[int] | tuple[int, ...] = (1, 2, 4, 8, 12, 24),
        par_iterations: int = 10,
        par_w1: float = 0.3,
        par_w2: float = 0.01,
        par_scale: float = 0.5,
        initializer_range: float = 0.02,
        **kwargs: Any,
    ):
        if backbone_config is None:
            backbone_config = ViTConfig()  # ViT-B/16
        elif isinstance(backbone_config, dict):
            backbone_config = ViTConfig(**{k: v for k, v in backbone_config.items() if k != "model_type"})
        self.backbone_config = backbone_config
        self.backbone_stem = backbone_stem
        self.conv_stem_init = conv_stem_init
        self.patch_mixer = patch_mixer
        self.mixer_dropout = mixer_dropout
        self.classifier_dropout = classifier_dropout
        self.pooling = pooling
        self.top_k_patches = top_k_patches
        self.akp_ratio = akp_ratio
        self.akp_min_k = akp_min_k
        self.akp_max_k = akp_max_k
        self.cls_loss_weight = cls_loss_weight
        self.pcl_loss_weight = pcl_loss_weight
        self.pcl_high_threshold = pcl_high_threshold
        self.pcl_low_threshold = pcl_low_threshold
        self.pcl_push_low = pcl_push_low
        self.pcl_margin = pcl_margin
        self.pcl_max_patches = pcl_max_patches
        self.decoder_hidden_size = decoder_hidden_size
        self.decoder_dilation = decoder_dilation
        self.seg_loss_weight = seg_loss_weight
        self.pseudo_label_threshold = pseudo_label_threshold
        self.pseudo_label_refine = pseudo_label_refine
        self.pseudo_label_max_classes = pseudo_label_max_classes
        self.par_dilations = list(par_dilations)
        self.par_iterations = par_iterations
        self.par_w1 = par_w1
        self.par_w2 = par_w2
        self.par_scale = par_scale
        self.initializer_range = initializer_range
        if "id2label" not in kwargs and "num_labels" not in kwargs and "label2id" not in kwargs:
            kwargs["id2label"] = dict(enumerate(VOC_CLASSES))
        super().__init__(**kwargs)
        if self.label2id is None or set(self.label2id.values()) != set(self.id2label.keys()):
            self.label2id = {name: i for i, name in self.id2label.items()}
        self.validate()

    @property
    def hidden_size(self) -> int:
        return self.backbone_config.hidden_size

    @property
    def patch_size(self) -> int:
        return self.backbone_config.patch_size

    def validate(self) -> None:
        """Raise a `ValueError` naming the field and the allowed values for any inconsistent setting."""

        def fail(field: str, allowed: str) -> None:
            raise ValueError(f"APCConfig.{field}={getattr(self, field)!r} is invalid: expected {allowed}.")

        if self.pooling not in POOLING_CHOICES:
            fail("pooling", f"one of {POOLING_CHOICES}")
        if self.backbone_stem not in BACKBONE_STEM_CHOICES:
            fail("backbone_stem", f"one of {BACKBONE_STEM_CHOICES}")
        if self.conv_stem_init not in CONV_STEM_INIT_CHOICES:
            fail("conv_stem_init", f"one of {CONV_STEM_INIT_CHOICES}")
        patch = self.patch_size
        if self.backbone_stem == "conv" and (patch < 2 or patch & (patch - 1)):
            raise ValueError(
                f"APCConfig.backbone_stem='conv' is invalid for patch_size={patch}: the stem reaches the patch grid "
                "with stride-2 convolutions, so the patch size must be a power of two >= 2 (e.g. 8 or 16)."
            )
        if self.patch_mixer not in PATCH_MIXER_CHOICES:
            fail("patch_mixer", f"one of {PATCH_MIXER_CHOICES}")
        if self.pseudo_label_refine not in PSEUDO_LABEL_REFINE_CHOICES:
            fail("pseudo_label_refine", f"one of {PSEUDO_LABEL_REFINE_CHOICES}")
        if self.num_labels < 2:
            raise ValueError(
                f"APCConfig.num_labels={self.num_labels} is invalid: expected >= 2 (background plus at least one class)."
            )
        for field in ("akp_ratio", "pcl_high_threshold", "pcl_low_threshold", "pseudo_label_threshold",
                      "mixer_dropout", "classifier_dropout"):
            value = getattr(self, field)
            if not 0.0 <= value <= 1.0:
                fail(field, "a number in [0, 1]")
        if self.pcl_low_threshold > self.pcl_high_threshold:
            fail("pcl_low_threshold", f"a number <= pcl_high_threshold ({self.pcl_high_threshold})")
        for field in ("top_k_patches", "akp_min_k", "akp_max_k", "pcl_max_patches", "decoder_hidden_size",
                      "decoder_dilation", "par_iterations"):
            if int(getattr(self, field)) < 1:
                fail(field, "an integer >= 1")
        if self.akp_min_k > self.akp_max_k:
            fail("akp_min_k", f"an integer <= akp_max_k ({self.akp_max_k})")
        for field in ("cls_loss_weight", "pcl_loss_weight", "seg_loss_weight", "pcl_margin", "par_w1", "par_w2"):
            if getattr(self, field) < 0:
                fail(field, "a number >= 0")
        if self.pseudo_label_max_classes is not None and int(self.pseudo_label_max_classes) < 1:
            fail("pseudo_label_max_classes", "None or an integer >= 1")
        if not 0.0 < self.par_scale <= 1.0:
            fail("par_scale", "a number in (0, 1]")
        if not self.par_dilations or any(int(d) < 1 for d in self.par_dilations):
            fail("par_dilations", "a non-empty list of integers >= 1")
        if self.patch_mixer == "hv_bilstm" and self.hidden_size % 4 != 0:
            raise ValueError(
                f"APCConfig.backbone_config.hidden_size={self.hidden_size} is invalid for patch_mixer='hv_bilstm': "
                "expected a multiple of 4 (two BiLSTMs of hidden_size // 4 units per direction are concatenated "
                "back to hidden_size). Use another hidden size or patch_mixer='none'."
            )

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        if isinstance(output.get("backbone_config"), ViTConfig):
            output["backbone_config"] = output["backbone_config"].to_dict()
        return output


__all__ = ["APCConfig"]
