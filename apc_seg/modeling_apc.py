"""APC: Adaptive-K Pooling + Patch Contrastive Learning on a ViT, trained in one stage from image-level labels.

Wu et al., "Adaptive Patch Contrast for Weakly Supervised Semantic Segmentation", EAAI 139, 2025
(arXiv 2407.10649). Baseline architecture: ViT-PCM (Rossetti et al., ECCV 2022).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, ViTModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_apc import APCConfig
from .pseudo_labels import make_pseudo_labels, mask_absent_classes
from .labels import IGNORE_INDEX

logger = logging.getLogger(__name__)

_SCORE_EPS = 1e-6


@dataclass
class APCSemanticSegmenterOutput(ModelOutput):
    """
    Output of [`APCForSemanticSegmentation`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `class_labels` is given):
            Weighted sum of the classification, patch-contrastive and decoder losses.
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels, height / patch_size, width / patch_size)`):
            Decoder logits at patch resolution; `post_process_semantic_segmentation` upsamples them.
        patch_logits (`torch.FloatTensor` of shape `(batch_size, num_labels, height / patch_size, width / patch_size)`):
            Patch classifier logits; their softmax over labels are the patch probabilities that are pooled.
        image_scores (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
            Pooled image-level class scores in [0, 1].
        loss_terms (`dict[str, torch.FloatTensor]`, *optional*):
            Unweighted `cls`, `pcl` and `seg` loss terms (detached), for logging.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
            The backbone's hidden states, each of shape `(batch_size, 1 + num_patches, hidden_size)`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    patch_logits: torch.FloatTensor | None = None
    image_scores: torch.FloatTensor | None = None
    loss_terms: dict[str, torch.Tensor] | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


def adaptive_k_pool(
    scores: torch.Tensor, ratio: float = 0.7, min_k: int = 1, max_k: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive-K Pooling (AKP): per class, the mean of the K best patch scores.

    K counts the patches whose score is at least `ratio` times the best one, clamped to `[min_k, max_k]`. It is chosen
    without gradient; the gradient reaches exactly the chosen patches. A lone outlier patch makes K small only when
    nothing else is near it, and then the image score needs several patches to be high, which is what stops one
    abnormal patch from deciding the image label (the failure mode of max pooling).

    Args:
        scores: `(B, C, N)` patch scores.

    Returns:
        `(B, C)` image scores and `(B, C)` the K used.
    """
    top = scores.topk(min(max_k, scores.shape[-1]), dim=-1).values  # B, C, k sorted descending
    with torch.no_grad():
        # Counting within the top max_k is the same as counting over all N and then clamping to max_k.
        k = (top >= ratio * top[..., :1]).sum(dim=-1).clamp(min_k, top.shape[-1])
        chosen = torch.arange(top.shape[-1], device=scores.device) < k.unsqueeze(-1)
    return (top * chosen).sum(dim=-1) / k.to(top.dtype), k


def pool_patch_scores(scores: torch.Tensor, config: APCConfig) -> torch.Tensor:
    """`(B, C, N)` patch scores -> `(B, C)` image scores with the configured pooling rule."""
    if config.pooling == "max":
        return scores.amax(dim=-1)
    if config.pooling == "topk":
        return scores.topk(min(config.top_k_patches, scores.shape[-1]), dim=-1).values.mean(dim=-1)
    return adaptive_k_pool(scores, config.akp_ratio, config.akp_min_k, config.akp_max_k)[0]


def image_classification_loss(image_scores: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of clamped pooled scores against multi-hot labels, in fp32.

    Written out rather than `F.binary_cross_entropy`, which autocast refuses on CUDA.
    """
    s = image_scores.float().clamp(_SCORE_EPS, 1.0 - _SCORE_EPS)
    y = class_labels.float()
    return -(y * s.log() + (1.0 - y) * (1.0 - s).log()).mean()


def patch_contrastive_loss(
    embeddings: torch.Tensor,
    patch_probs: torch.Tensor,
    class_labels: torch.Tensor,
    high_threshold: float = 0.8,
    low_threshold: float = 0.4,
    push_low: bool = True,
    margin: float = 0.0,
    max_patches: int = 256,
) -> torch.Tensor:
    """Patch Contrastive Learning (PCL) within each image.

    Patches take the argmax of their label-masked probabilities as class, its probability as confidence. Confident
    same-class pairs are pulled together (`1 - cos`); confident pairs of different classes, and (with `push_low`)
    uncertain-confident pairs, are pushed apart (`relu(cos - margin)`). Each term is a mean over its pairs, pooled
    over the batch, and exactly 0 when there are none.

    Args:
        embeddings: `(B, N, D)` patch embeddings (normalised here).
        patch_probs: `(B, C, N)` patch probabilities.
        class_labels: `(B, C)` multi-hot image labels.
        max_patches: at most this many patches per image (a random subset) enter the `(M, M)` pair matrix.
    """
    batch_size, num_patches, _ = embeddings.shape
    with torch.no_grad():
        confidence, assigned = mask_absent_classes(patch_probs.float(), class_labels).max(dim=1)  # B, N
        if num_patches > max_patches:
            keep = torch.rand(batch_size, num_patches, device=embeddings.device).argsort(dim=1)[:, :max_patches]
            confidence = confidence.gather(1, keep)
            assigned = assigned.gather(1, keep)
    if num_patches > max_patches:
        embeddings = embeddings.gather(1, keep.unsqueeze(-1).expand(-1, -1, embeddings.shape[-1]))
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        emb = F.normalize(embeddings.float(), dim=-1)
        cos = emb @ emb.transpose(1, 2)  # B, M, M; fp32: cosines near 1 are what the pull term measures
    with torch.no_grad():
        high = confidence >= high_threshold
        low = confidence < low_threshold
        same = assigned.unsqueeze(2) == assigned.unsqueeze(1)
        high_pair = high.unsqueeze(2) & high.unsqueeze(1)
        not_self = ~torch.eye(cos.shape[-1], dtype=torch.bool, device=cos.device)
        positive = high_pair & same & not_self
        negative = high_pair & ~same
        if push_low:
            negative = negative | (low.unsqueeze(2) & high.unsqueeze(1)) | (high.unsqueeze(2) & low.unsqueeze(1))
    pull = ((1.0 - cos) * positive).sum() / positive.sum().clamp_min(1)
    push = ((cos - margin).relu() * negative).sum() / negative.sum().clamp_min(1)
    return pull + push


class APCConvStem(nn.Module):
    """A convolutional stem in place of ViT's linear patch embedding (`backbone_stem="conv"`).

    Xiao et al., "Early Convolutions Help Transformers See Better" (NeurIPS 2021): `log2(patch_size)` stages of 3x3
    stride-2 conv + BatchNorm + ReLU, widths doubling up to `hidden_size`, then a 1x1 projection to `hidden_size`.
    Why: a ViT trained from scratch on image labels learns a class's hue (linear in the pixels, which the linear patch
    embedding sees at once) long before its texture (nonlinear, which only the attention layers can compute), and
    then paints the class on background of that hue; the stem gives every patch token local texture features from
    the first step. On the synthetic benchmark it took the recipe's test mIoU from 45 to 78 (docs/benchmarks.md).
    BatchNorm, as in the paper: the same stem with GroupNorm + GELU did not learn the image labels in the recipe's
    budget (val 26). The convolutions are He-initialised by `APCForSemanticSegmentation` (`conv_stem_init`).
    """

    def __init__(self, config: APCConfig):
        super().__init__()
        hidden, stages = config.hidden_size, config.patch_size.bit_length() - 1
        layers, width_in = [], config.backbone_config.num_channels
        for stage in range(stages):
            width = max(16, hidden >> (stages - 1 - stage))
            layers += [nn.Conv2d(width_in, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True)]
            width_in = width
        self.layers = nn.Sequential(*layers)
        self.projection = nn.Conv2d(width_in, hidden, 1)

    @property
    def weight(self) -> torch.Tensor:
        # `ViTModel.forward` casts the pixels to `embeddings.patch_embeddings.projection.weight.dtype`, the module
        # this stem replaces.
        return self.projection.weight

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(B, 3, H, W)` -> `(B, hidden_size, H / patch_size, W / patch_size)`."""
        return self.projection(self.layers(pixel_values))


class APCPatchMixer(nn.Module):
    """ViT-PCM's HV-BiLSTM: a BiLSTM along each row and one along each column of the patch grid.

    Each has `hidden_size // 4` units per direction, so rows and columns give `hidden_size // 2` each and their
    concatenation is `hidden_size` again. The LSTMs run in fp32 even under autocast: oneDNN has no bf16 LSTM on many
    CPUs, and the recurrence is a small share of the compute.
    """

    def __init__(self, config: APCConfig):
        super().__init__()
        hidden = config.hidden_size
        self.dropout = nn.Dropout(config.mixer_dropout)
        self.horizontal = nn.LSTM(hidden, hidden // 4, batch_first=True, bidirectional=True)
        self.vertical = nn.LSTM(hidden, hidden // 4, batch_first=True, bidirectional=True)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        """`(B, h, w, D)` -> `(B, h, w, D)`."""
        batch_size, height, width, hidden = grid.shape
        x = self.dropout(grid)
        with torch.autocast(device_type=grid.device.type, enabled=False):
            x = x.float()
            rows = self.horizontal(x.reshape(batch_size * height, width, hidden))[0]
            cols = self.vertical(x.transpose(1, 2).reshape(batch_size * width, height, hidden))[0]
        rows = rows.reshape(batch_size, height, width, -1)
        cols = cols.reshape(batch_size, width, height, -1).transpose(1, 2)
        return torch.cat([rows, cols], dim=-1)


class APCDecoder(nn.Module):
    """LargeFOV-style head (DeepLab v1) on the backbone's patch grid: two dilated 3x3 convs and a 1x1 classifier."""

    def __init__(self, config: APCConfig):
        super().__init__()
        hidden, dilation = config.decoder_hidden_size, config.decoder_dilation
        self.conv1 = nn.Conv2d(config.hidden_size, hidden, 3, padding=dilation, dilation=dilation)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=dilation, dilation=dilation)
        self.classifier = nn.Conv2d(hidden, config.num_labels, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """`(B, D, h, w)` -> `(B, num_labels, h, w)` logits."""
        return self.classifier(F.relu(self.conv2(F.relu(self.conv1(features)))))


class APCPreTrainedModel(PreTrainedModel):
    config_class = APCConfig
    config: APCConfig
    base_model_prefix = "vit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["ViTEmbeddings", "ViTLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        # The new layers (mixer LSTMs, classifier, decoder convs). `self.vit` is a transformers sub-model: its modules,
        # embeddings included, are initialised by ViT's own `_init_weights`.
        super()._init_weights(module)


class APCForSemanticSegmentation(APCPreTrainedModel):
    """
    APC semantic segmenter: ViT backbone -> HV-BiLSTM patch mixer -> patch classifier pooled into image scores
    (trained with BCE on image labels, plus PCL on the mixer's embeddings), and a LargeFOV decoder on the backbone
    grid trained on online pseudo-labels made from the patch probabilities.
    """

    def __init__(self, config: APCConfig):
        super().__init__(config)
        self.vit = ViTModel(config.backbone_config, add_pooling_layer=False)
        if config.backbone_stem == "conv":
            self.vit.embeddings.patch_embeddings.projection = APCConvStem(config)
        self.mixer = APCPatchMixer(config) if config.patch_mixer == "hv_bilstm" else nn.Identity()
        self.classifier_dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.decoder = APCDecoder(config)
        self.post_init()
        if config.backbone_stem == "conv" and config.conv_stem_init == "he":
            self._init_conv_stem()

    def _init_conv_stem(self) -> None:
        # He initialisation (fan_out, as torchvision's ResNets) of the stem's convolutions. Done here, after
        # `post_init`, because transformers hands every module under `self.vit` to ViT's own `_init_weights`, which
        # gives a Conv2d std 0.02 (`conv_stem_init="vit"` keeps that). Why it matters: each conv is followed by
        # BatchNorm, so the loss does not depend on the conv's scale, and Adam moves a weight by about the learning
        # rate per step whatever its size: 5% of std 0.02 at the synthetic recipe's peak rate. `init.*` leaves loaded
        # weights alone.
        for layer in self.vit.embeddings.patch_embeddings.projection.layers:
            if isinstance(layer, nn.Conv2d):
                init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")

    @classmethod
    def from_pretrained_backbone(
        cls,
        pretrained_model_name_or_path: str,
        config: APCConfig | None = None,
        image_size: int | None = None,
        **kwargs,
    ) -> "APCForSemanticSegmentation":
        """A new APC model whose backbone is loaded from a `ViTModel` checkpoint (a local folder or a Hub id).

        The checkpoint's ViT config replaces `config.backbone_config`; every other module is newly initialised and
        listed in the log. With `image_size` (e.g. the 448 training crop of a 224 checkpoint) the position
        embeddings are resized once here instead of being interpolated in every forward pass. `kwargs` go to
        `ViTModel.from_pretrained` (e.g. `attn_implementation`, `revision`).
        """
        config = APCConfig() if config is None else config
        if config.backbone_stem != "patch":
            raise ValueError(
                f"APCConfig.backbone_stem={config.backbone_stem!r} replaces the backbone's patch embedding with a new "
                f"stem, which the pretrained layers of {pretrained_model_name_or_path} were not trained on: use "
                "backbone_stem='patch' (the default) with a pretrained backbone."
            )
        backbone = ViTModel.from_pretrained(pretrained_model_name_or_path, add_pooling_layer=False, **kwargs)
        config.backbone_config = backbone.config
        config.validate()
        model = cls(config)
        result = model.vit.load_state_dict(backbone.state_dict(), strict=False)
        if result.unexpected_keys:
            logger.warning("Unused weights of %s: %s", pretrained_model_name_or_path, result.unexpected_keys)
        if result.missing_keys:
            logger.warning(
                "Backbone weights not in %s, newly initialised: %s", pretrained_model_name_or_path, result.missing_keys
            )
        new = sorted({name.split(".")[0] for name, _ in model.named_parameters() if not name.startswith("vit.")})
        logger.info("Loaded the backbone from %s; newly initialised modules: %s", pretrained_model_name_or_path, new)
        model.backbone_loading_info = {"missing_keys": result.missing_keys, "unexpected_keys": result.unexpected_keys,
                                       "new_modules": new}
        if image_size is not None:
            model.resize_position_embeddings(image_size)
        return model

    @torch.no_grad()
    def resize_position_embeddings(self, image_size: int) -> None:
        """Resample the backbone's position embeddings (bicubic, as ViT's own interpolation) to `image_size`.

        Inputs of other sizes still work; they are interpolated on the fly, which costs a few ms per step for ViT-B.
        """
        embeddings = self.vit.embeddings
        patch = self.config.patch_size
        if image_size % patch:
            raise ValueError(f"image_size={image_size} is not a multiple of the patch size {patch}.")
        num_patches = (image_size // patch) ** 2
        dummy = embeddings.position_embeddings.new_empty(1, num_patches + 1, self.config.hidden_size)
        resized = embeddings.interpolate_pos_encoding(dummy, image_size, image_size)
        embeddings.position_embeddings = nn.Parameter(resized.contiguous())
        embeddings.patch_embeddings.image_size = (image_size, image_size)
        embeddings.patch_embeddings.num_patches = num_patches
        self.config.backbone_config.image_size = image_size

    def _backbone_grid(self, pixel_values: torch.Tensor, output_hidden_states: bool | None):
        height, width = pixel_values.shape[-2:]
        patch = self.config.patch_size
        if height % patch or width % patch:
            raise ValueError(
                f"pixel_values of size {height}x{width} is not a multiple of the patch size {patch}: resize or pad the "
                f"image (APCImageProcessor does), e.g. to {max(patch, round(height / patch) * patch)}x"
                f"{max(patch, round(width / patch) * patch)}."
            )
        outputs = self.vit(pixel_values, interpolate_pos_encoding=True, output_hidden_states=output_hidden_states)
        tokens = outputs.last_hidden_state[:, 1:]  # drop CLS
        grid = tokens.reshape(tokens.shape[0], height // patch, width // patch, tokens.shape[-1])
        return grid, outputs.hidden_states

    def forward(
        self,
        pixel_values: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        use_seg_loss: bool = True,
        **kwargs,
    ) -> APCSemanticSegmenterOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`):
                Images; height and width must be multiples of the patch size (any such size works: the position
                embeddings are interpolated).
            class_labels (`torch.FloatTensor` of shape `(batch_size, num_labels)`, *optional*):
                Multi-hot image labels, index 0 (background) always 1. When given, the losses are computed.
            use_seg_loss (`bool`, *optional*, defaults to `True`):
                Whether to compute the decoder's pseudo-label loss; the trainer turns it on after `seg_warmup_steps`,
                when the patch classifier has become a useful teacher.

        Returns:
            [`APCSemanticSegmenterOutput`] (or a tuple when `return_dict=False`).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        grid, hidden_states = self._backbone_grid(pixel_values, output_hidden_states)
        embeddings = self.mixer(grid)  # B, h, w, D
        patch_logits = self.classifier(self.classifier_dropout(embeddings)).permute(0, 3, 1, 2)  # B, C, h, w
        patch_probs = patch_logits.float().softmax(dim=1)
        image_scores = pool_patch_scores(patch_probs.flatten(2), self.config)
        logits = self.decoder(grid.permute(0, 3, 1, 2))

        loss, loss_terms = None, None
        if class_labels is not None:
            loss, loss_terms = self._losses(
                pixel_values, class_labels, embeddings, patch_probs, image_scores, logits, use_seg_loss
            )
        if not return_dict:
            output = (logits, patch_logits, image_scores) + ((hidden_states,) if output_hidden_states else ())
            return ((loss, loss_terms) + output) if loss is not None else output
        return APCSemanticSegmenterOutput(
            loss=loss,
            logits=logits,
            patch_logits=patch_logits,
            image_scores=image_scores,
            loss_terms=loss_terms,
            hidden_states=hidden_states if output_hidden_states else None,
        )

    def _losses(self, pixel_values, class_labels, embeddings, patch_probs, image_scores, logits, use_seg_loss):
        config = self.config
        if class_labels.shape[-1] != config.num_labels:
            raise ValueError(
                f"class_labels has {class_labels.shape[-1]} columns but the model has num_labels={config.num_labels} "
                "(background included): build the multi-hot labels with the model's label set."
            )
        class_labels = class_labels.to(patch_probs.dtype)
        zero = patch_probs.new_zeros(())
        cls_loss = image_classification_loss(image_scores, class_labels)
        pcl_loss = zero
        if config.pcl_loss_weight > 0:
            pcl_loss = patch_contrastive_loss(
                embeddings.flatten(1, 2),
                patch_probs.flatten(2),
                class_labels,
                high_threshold=config.pcl_high_threshold,
                low_threshold=config.pcl_low_threshold,
                push_low=config.pcl_push_low,
                margin=config.pcl_margin,
                max_patches=config.pcl_max_patches,
            )
        seg_loss = zero
        if use_seg_loss and config.seg_loss_weight > 0:
            pseudo = self.make_pseudo_labels(patch_probs.detach(), class_labels, pixel_values)
            seg_loss = decoder_loss(logits, pseudo)
        loss = config.cls_loss_weight * cls_loss + config.pcl_loss_weight * pcl_loss + config.seg_loss_weight * seg_loss
        terms = {"cls": cls_loss.detach(), "pcl": pcl_loss.detach(), "seg": seg_loss.detach()}
        return loss, terms

    def make_pseudo_labels(self, patch_probs, class_labels, pixel_values) -> torch.Tensor:
        """`(B, C, h, w)` patch probabilities -> `(B, H, W)` pixel pseudo-labels with this model's settings."""
        config = self.config
        return make_pseudo_labels(
            patch_probs,
            class_labels,
            pixel_values,
            threshold=config.pseudo_label_threshold,
            refine=config.pseudo_label_refine,
            par_kwargs={"dilations": config.par_dilations, "iterations": config.par_iterations,
                        "w1": config.par_w1, "w2": config.par_w2},
            par_scale=config.par_scale,
            max_classes=config.pseudo_label_max_classes,
        )

    @torch.no_grad()
    def pseudo_labels(self, pixel_values: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """Pixel pseudo-labels the model would train its decoder on, for judging them on a labelled train split.

        Args:
            pixel_values: `(B, 3, H, W)` images.
            class_labels: `(B, num_labels)` multi-hot image labels.

        Returns:
            `(B, H, W)` int64 labels, 255 where the patch classifier is not confident enough.
        """
        grid, _ = self._backbone_grid(pixel_values, output_hidden_states=False)
        patch_logits = self.classifier(self.classifier_dropout(self.mixer(grid))).permute(0, 3, 1, 2)
        return self.make_pseudo_labels(patch_logits.float().softmax(dim=1), class_labels.float(), pixel_values)


def bilinear_upsampling_matrix(in_size: int, out_size: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """`(out_size, in_size)` matrix `M` with `M @ x` equal to `F.interpolate(mode="bilinear",
    align_corners=False)` along one axis (PyTorch's source-index rule: `(i + 0.5) * in / out - 0.5`, clamped at 0)."""
    # Built on the device in `dtype` (no host copy, which would sync the step; no float64, which MPS lacks); PyTorch's
    # kernel also computes the weights in the input's precision.
    source = torch.arange(out_size, device=device, dtype=dtype)
    source = ((source + 0.5) * (in_size / out_size) - 0.5).clamp_min(0)
    low = source.floor().long().clamp_max(in_size - 1)
    high = (low + 1).clamp_max(in_size - 1)
    frac = source - low
    matrix = torch.zeros(out_size, in_size, device=device, dtype=dtype)
    rows = torch.arange(out_size, device=device)
    matrix.index_put_((rows, low), 1.0 - frac, accumulate=True)
    matrix.index_put_((rows, high), frac, accumulate=True)
    return matrix


def decoder_loss(logits: torch.Tensor, pseudo_labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of `(B, C, h, w)` decoder logits, upsampled to the `(B, H, W)` labels, ignoring 255.

    A sum over labelled pixels divided by their count (at least 1), so an all-ignored batch gives exactly 0, where
    `F.cross_entropy(reduction="mean")` would give NaN.

    The bilinear upsampling is written as two small fp32 matmuls (`M_h @ logits @ M_w^T`, the same values as
    `F.interpolate`): the backward of `upsample_bilinear2d` scatters with atomic adds into the few low-resolution
    cells and was 6 ms of a 45-60 ms ViT-B step on an H200 (docs/benchmarks.md); the matmuls' backward is a dense
    matmul.
    """
    height, width = pseudo_labels.shape[-2:]
    rows = bilinear_upsampling_matrix(logits.shape[-2], height, logits.device)
    cols = bilinear_upsampling_matrix(logits.shape[-1], width, logits.device)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        upsampled = rows @ logits.float() @ cols.T  # B, C, H, W in fp32
    per_pixel = F.cross_entropy(upsampled, pseudo_labels, ignore_index=IGNORE_INDEX, reduction="none")
    return per_pixel.sum() / (pseudo_labels != IGNORE_INDEX).sum().clamp_min(1)


__all__ = [
    "APCConvStem",
    "APCForSemanticSegmentation",
    "APCPreTrainedModel",
    "APCSemanticSegmenterOutput",
    "adaptive_k_pool",
    "patch_contrastive_loss",
]
