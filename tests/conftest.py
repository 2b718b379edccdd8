"""Shared fixtures: tiny, seeded, offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from apc_seg import APCConfig

TINY_BACKBONE = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8, image_size=32
)


def tiny_config(**overrides) -> APCConfig:
    """A 2-layer, hidden-32, patch-8 APC config with 3 labels (background + 2)."""
    kwargs = dict(
        backbone_config=dict(TINY_BACKBONE),
        id2label={0: "background", 1: "cat", 2: "dog"},
        decoder_hidden_size=16,
        decoder_dilation=2,
    )
    kwargs.update(overrides)
    return APCConfig(**kwargs)


@pytest.fixture
def config():
    return tiny_config()


@pytest.fixture
def one_torch_thread():
    """oneDNN's LSTM is 100x slower with 2 threads on a busy 2-core machine; the tiny models need only one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
