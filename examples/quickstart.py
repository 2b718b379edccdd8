"""Quick start: load a trained APC model, segment one image, save an overlay.

    apc-train --recipe synthetic                  # a few minutes on 2 CPU cores; writes apc-synthetic/
    python examples/quickstart.py                 # segments a synthetic test image -> overlay.png
    python examples/quickstart.py --model apc-voc --image photo.jpg --output photo_overlay.png

It uses the plain transformers API (Auto classes, the image processor and its post-processing), so the same lines
work for a model folder or a Hub id such as USER/apc-voc. `apc-infer` does the same for many images, with the
evaluation protocol's full resolution, multi-scale, flip and CRF options.
"""

import argparse

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

import apc_seg  # noqa: F401  (importing apc_seg registers APC with the Auto classes)
from apc_seg.infer import overlay


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="apc-synthetic", help="apc-train's output folder or a Hub id")
    parser.add_argument("--image", help="an image file (default: an image of the synthetic test split)")
    parser.add_argument("--output", default="overlay.png")
    args = parser.parse_args()

    model = AutoModelForSemanticSegmentation.from_pretrained(args.model).eval()
    processor = AutoImageProcessor.from_pretrained(args.model)
    if args.image:
        image = Image.open(args.image).convert("RGB")
    else:
        from apc_seg.data import make_synthetic

        image = make_synthetic(num_train=0, num_val=0, num_test=1)["test"][0]["image"].convert("RGB")

    inputs = processor(images=image, return_tensors="pt")  # resized to the training crop, normalised
    with torch.no_grad():
        outputs = model(**inputs)
    # Logits are at patch resolution; post-processing upsamples them to the image and takes the argmax.
    labels = processor.post_process_semantic_segmentation(outputs, target_sizes=[(image.height, image.width)])[0]
    labels = labels.numpy().astype(np.uint8)

    overlay(image, labels).save(args.output)
    found = [model.config.id2label[int(c)] for c in np.unique(labels)]
    print(f"Classes found: {', '.join(found)}. Saved {args.output}")


if __name__ == "__main__":
    main()
