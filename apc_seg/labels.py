"""Class lists and the colour palette: the one place they are defined.

Index 0 is always ``background``; ``num_labels`` therefore counts it (21 for VOC, 81 for COCO).
"""

from __future__ import annotations

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

# COCO 2014/2017 detection category ids (1..90 with gaps) and names, in id order. They are mapped to contiguous
# label ids 1..80 (0 = background) by position in this tuple.
COCO_CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"), (7, "train"),
    (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"),
    (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"),
    (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"), (27, "backpack"),
    (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"),
    (36, "snowboard"), (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"), (46, "wine glass"), (47, "cup"),
    (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"), (54, "sandwich"),
    (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"),
    (62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"),
    (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"), (77, "cell phone"),
    (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"), (82, "refrigerator"), (84, "book"),
    (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)
COCO_CLASSES: tuple[str, ...] = ("background",) + tuple(name for _, name in COCO_CATEGORIES)
COCO_CATEGORY_TO_LABEL: dict[int, int] = {cat_id: i + 1 for i, (cat_id, _) in enumerate(COCO_CATEGORIES)}

# Classes of the built-in synthetic dataset (apc_seg.data.synthetic): a class is a texture family with a typical
# hue; shape is drawn independently of the class, so only local appearance tells classes apart.
SYNTHETIC_CLASSES: tuple[str, ...] = ("background", "stripes", "dots", "checker")

IGNORE_INDEX = 255


def _voc_colormap(n: int = 256) -> list[int]:
    # The standard PASCAL VOC bit-interleaving colour map, so our index PNGs open with the usual colours.
    palette = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.extend((r, g, b))
    return palette


VOC_PALETTE: list[int] = _voc_colormap()  # flat [r0, g0, b0, r1, ...], 256 entries; index 255 is (224, 224, 192)


def id2label_for(dataset: str) -> dict[int, str]:
    """``id2label`` for ``"voc"``, ``"coco"`` or ``"synthetic"``."""
    classes = {"voc": VOC_CLASSES, "coco": COCO_CLASSES, "synthetic": SYNTHETIC_CLASSES}.get(dataset)
    if classes is None:
        raise ValueError(f"Unknown dataset {dataset!r}; expected one of 'voc', 'coco', 'synthetic'.")
    return dict(enumerate(classes))
