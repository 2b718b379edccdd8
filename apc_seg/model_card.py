"""Model cards (README.md) for trained APC checkpoints.

``apc-train`` writes one next to the weights and ``apc-push`` uploads it; both call :func:`make_model_card`.
The YAML front matter follows the Hub's model card metadata (rendered by ``huggingface_hub.ModelCardData``), so the
Hub shows the task, the library, the dataset and, when a validation mIoU is known, a model-index entry.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from huggingface_hub import EvalResult, ModelCardData

APC_ARXIV_URL = "https://arxiv.org/abs/2407.10649"

APC_BIBTEX = """\
@article{wu2025apc,
  title         = {Adaptive Patch Contrast for Weakly Supervised Semantic Segmentation},
  author        = {Wu, Wangyu and Dai, Tianhong and Chen, Zhenhong and Huang, Xiaowei and Xiao, Jimin and Ma, Fei and Ouyang, Renrong},
  journal       = {Engineering Applications of Artificial Intelligence},
  volume        = {139},
  year          = {2025},
  eprint        = {2407.10649},
  archivePrefix = {arXiv},
  primaryClass  = {cs.CV}
}"""

# Display names for the datasets apc-train knows; any other name is shown as given.
DATASET_DISPLAY_NAMES = {
    "voc": "PASCAL VOC 2012",
    "coco": "MS COCO 2014",
    "synthetic": "apc-seg synthetic shapes",
}

# Metrics whose values are fractions in [0, 1] (metrics.json convention); the card shows them in percent.
_FRACTION_METRICS = ("val_miou", "train_pseudo_miou", "miou", "pixel_accuracy", "mean_accuracy")


def _format_value(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and (key in _FRACTION_METRICS or key.endswith("miou") or key.endswith("accuracy")):
        return f"{100 * value:.2f} %"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def _table(rows: Mapping[str, Any], header: tuple[str, str]) -> str:
    # Pipes inside values would break the Markdown table.
    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    lines += [f"| `{k}` | {_format_value(k, v).replace('|', '/')} |" for k, v in rows.items()]
    return "\n".join(lines)


def make_model_card(
    model_id: str,
    dataset_name: str,
    class_names: Sequence[str],
    recipe: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    hardware: str | None = None,
    base_model: str | None = None,
    license: str = "apache-2.0",
) -> str:
    """Markdown text of a model card with YAML front matter.

    Args:
        model_id: the repo id or local folder name users load (``"user/apc-voc"`` or ``"apc-voc"``).
        dataset_name: ``"voc"``, ``"coco"``, ``"synthetic"`` or any other dataset name.
        class_names: the ``num_labels`` class names, background first.
        recipe: training hyperparameters (flag name -> value), rendered as a table.
        metrics: the contents of ``metrics.json``: ``val_miou`` and ``train_pseudo_miou`` as fractions in [0, 1],
            ``train_steps``, ``train_seconds``, ... ``val_miou`` also goes into the model-index (in percent).
        hardware: what it was trained on, e.g. ``"1x NVIDIA H100 80GB, bf16"``.
        base_model: the backbone checkpoint it started from (Hub id), or ``None`` if trained from scratch.
        license: SPDX-style license id for the weights.
    """
    recipe = dict(recipe or {})
    metrics = dict(metrics or {})
    dataset_display = DATASET_DISPLAY_NAMES.get(dataset_name, dataset_name)
    model_name = model_id.rstrip("/").split("/")[-1]

    eval_results = None
    if metrics.get("val_miou") is not None:
        eval_results = [
            EvalResult(
                task_type="image-segmentation",
                task_name="Semantic Segmentation",
                dataset_type=dataset_name,
                dataset_name=dataset_display,
                dataset_split=str(recipe.get("val_split", "val")),
                metric_type="mean_iou",
                metric_name="mIoU",
                metric_value=round(100 * float(metrics["val_miou"]), 2),
            )
        ]
    card_data = ModelCardData(
        model_name=model_name,
        library_name="apc-seg",
        license=license,
        pipeline_tag="image-segmentation",
        tags=["image-segmentation", "weakly-supervised-semantic-segmentation", "apc", "vision-transformer"],
        datasets=[dataset_name],
        metrics=["mean_iou"],
        base_model=base_model,
        eval_results=eval_results,
    )

    sections = [
        f"---\n{card_data.to_yaml()}\n---",
        f"# {model_name}",
        (
            f"A weakly supervised semantic segmentation model for {dataset_display} ({len(class_names)} classes, "
            "background included), trained from image-level labels only with "
            f"[APC]({APC_ARXIV_URL}) and the [apc-seg](https://pypi.org/project/apc-seg/) package."
            + (f" The ViT backbone starts from [`{base_model}`](https://huggingface.co/{base_model})." if base_model else "")
        ),
        "## Method",
        (
            "APC (Adaptive Patch Contrast; Wu et al., EAAI 2025) trains a segmenter from image-level class labels "
            "in a single stage on a Vision Transformer:\n\n"
            "1. every ViT patch token is classified (background is a class);\n"
            "2. **Adaptive-K Pooling (AKP)** turns the patch scores into image scores by averaging, per class, the "
            "top-K patches whose score is within a ratio of the best one, trained against the image labels;\n"
            "3. **Patch Contrastive Learning (PCL)** pulls confident patch embeddings of the same class together "
            "and pushes those of different classes apart;\n"
            "4. the patch scores, turned into pixel pseudo-labels on the fly, supervise a segmentation decoder in "
            "the same run (no separate CAM or DeepLab stage)."
        ),
        "## How to use",
        (
            "```python\n"
            "import apc_seg  # registers APC with the transformers Auto classes\n"
            "from PIL import Image\n"
            "from apc_seg import APCForSemanticSegmentation, APCImageProcessor\n\n"
            f'model = APCForSemanticSegmentation.from_pretrained("{model_id}")\n'
            f'processor = APCImageProcessor.from_pretrained("{model_id}")\n'
            'image = Image.open("image.jpg").convert("RGB")\n'
            'outputs = model(**processor(images=image, return_tensors="pt"))\n'
            "mask = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]\n"
            "```\n\n"
            "or with a pipeline (one mask per class present in the image):\n\n"
            "```python\n"
            "from transformers import pipeline\n\n"
            f'segmenter = pipeline("image-segmentation", model="{model_id}")\n'
            'segments = segmenter("image.jpg")\n'
            "```\n\n"
            f"From the command line: `apc-infer --model {model_id} IMAGES... --output_dir out`."
        ),
        "## Classes",
        ", ".join(f"{i}: {name}" for i, name in enumerate(class_names)),
        "## Training recipe",
        _table(recipe, ("hyperparameter", "value")) if recipe else "Not recorded.",
        "## Metrics",
        (
            "mIoU over the whole split from one confusion matrix, ignoring label 255; `val_miou` is the decoder "
            "on the validation split, `train_pseudo_miou` the online pseudo-labels on the training split.\n\n"
            + _table(metrics, ("metric", "value"))
            if metrics
            else "Not evaluated."
        ),
        "## Hardware",
        hardware or "Not recorded.",
        "## Citation",
        f"```bibtex\n{APC_BIBTEX}\n```",
    ]
    return "\n\n".join(sections) + "\n"
