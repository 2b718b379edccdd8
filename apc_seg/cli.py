"""What the console scripts (apc-train, apc-eval, apc-infer, apc-push, apc-pretrain) share."""

from __future__ import annotations

import argparse
import os
import sys


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line naming the flag (``apc-eval: error: ...``), with exit status 2.

    Abbreviated flags are refused, so a typo such as ``--privat`` fails instead of silently matching ``--private``.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (the message names the flag through argparse)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (e.g. a worker count, where 0 means "in this process")."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def default_num_workers() -> int:
    """Worker processes when the user names none: the CPU count, at most 8 (beyond 8, decoding stops scaling)."""
    return min(8, os.cpu_count() or 1)


def add_preprocessing_num_workers(parser) -> None:
    """`--preprocessing_num_workers`, as in transformers' example scripts: processes that build a VOC/COCO split."""
    parser.add_argument(
        "--preprocessing_num_workers", type=positive_int, default=default_num_workers(),
        help="Processes that decode and check the images when a VOC / COCO split is first built and cached "
             "(default: the CPU count, at most 8; 1,000 images per process at least; the cache is the same).")


def usable_mixed_precision(requested: str, flag_given: bool) -> str:
    """The `--mixed_precision` this machine can run, or `ValueError` naming the flag.

    No GPU: "no" (bf16 autocast on a CPU is slower than fp32 for these ops; results match within tolerance). A GPU
    without bf16 (V100, T4, ...) and a recipe's bf16: fp16, with a notice; asked for by the flag, bf16 there is an
    error that says what to use instead.
    """
    import torch

    if requested == "no" or not torch.cuda.is_available():
        return "no"
    if requested == "bf16" and not torch.cuda.is_bf16_supported():
        gpu = torch.cuda.get_device_name()
        if flag_given:
            raise ValueError(f"--mixed_precision bf16: the {gpu} has no bf16; use --mixed_precision fp16 (or no)")
        print(f"The recipe's bf16 is not supported by the {gpu}: training in fp16 (--mixed_precision to choose).",
              file=sys.stderr)
        return "fp16"
    return requested


def parse_scales(text: str) -> tuple[float, ...]:
    """`"1.0,1.25,1.5"` -> `(1.0, 1.25, 1.5)`; raises `ValueError` naming the flag and the offending text."""
    try:
        scales = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"--scales {text!r} is not a comma-separated list of numbers, e.g. 1.0,1.25,1.5") from None
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"--scales {text!r} must list one or more positive numbers, e.g. 1.0,1.25,1.5")
    return scales


def prediction_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[float, ...]:
    """Check `--scales` and `--crf` of apc-eval / apc-infer before any work; returns the scales."""
    try:
        scales = parse_scales(args.scales)
    except ValueError as error:
        parser.error(str(error))
    if args.crf:
        from .crf import _import_densecrf

        try:
            _import_densecrf()
        except ImportError as error:
            parser.error(f"--crf: {error}")
    return scales
