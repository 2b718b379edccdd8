"""Upload a trained APC model folder to the Hugging Face Hub (``apc-push``).

What goes up: the weights (``model.safetensors``, or its shards and index), ``config.json``,
``preprocessor_config.json``, ``README.md`` (the model card; generated from ``config.json`` + ``metrics.json`` when
the folder has none) and ``metrics.json``. Nothing else: checkpoints, TensorBoard logs and pickled weights stay
local. The upload is one commit (``create_repo(exist_ok=True)`` then ``create_commit``) through an ``HfApi``-like
client, which tests replace with a fake.

The token is handed to the client and nowhere else: it is never printed, logged or written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from .cli import OneLineParser
from .model_card import make_model_card

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
OTHER_FILES = ("config.json", "preprocessor_config.json", "metrics.json", "README.md")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def _upload_files(model_dir: Path) -> list[Path]:
    """The files of ``model_dir`` to upload, in a fixed order."""
    files = [model_dir / name for name in (*WEIGHT_FILES, *OTHER_FILES) if (model_dir / name).is_file()]
    # Sharded checkpoints: model-00001-of-00003.safetensors ... listed by model.safetensors.index.json.
    files += sorted(p for p in model_dir.glob("model-*-of-*.safetensors") if p.is_file())
    return files


def validate_model_dir(model_dir: str | Path) -> Path:
    """Checks that ``model_dir`` is a saved APC model; returns it as a Path.

    Raises:
        ValueError: with a message saying what is missing (the folder, ``config.json`` or safetensors weights).
    """
    path = Path(model_dir)
    if not path.is_dir():
        raise ValueError(f"{model_dir} is not a directory")
    if not (path / "config.json").is_file():
        raise ValueError(f"{model_dir} has no config.json; save the model with save_pretrained(...) first")
    has_weights = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    if not has_weights:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(
                f"{model_dir} holds only pickled weights ({', '.join(pickles)}); apc-push uploads safetensors "
                "only: load the model and save it again with save_pretrained(...)"
            )
        raise ValueError(f"{model_dir} has no model.safetensors")
    return path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err


def card_from_model_dir(model_dir: str | Path, model_id: str) -> str:
    """Builds README.md text from ``config.json`` (class names) and ``metrics.json`` (if present).

    ``metrics.json`` may also carry ``dataset``, ``recipe`` (a dict), ``hardware`` and ``base_model``; they are
    used for the card and not listed among the metrics.
    """
    model_dir = Path(model_dir)
    config = _read_json(model_dir / "config.json")
    metrics = _read_json(model_dir / "metrics.json") if (model_dir / "metrics.json").is_file() else {}
    id2label = config.get("id2label") or {}
    class_names = [id2label[k] for k in sorted(id2label, key=int)]
    metrics = dict(metrics)
    dataset = metrics.pop("dataset", None) or config.get("dataset") or "unknown"
    recipe = metrics.pop("recipe", None)
    hardware = metrics.pop("hardware", None)
    base_model = metrics.pop("base_model", None)
    # Per-class lists make the metrics table unreadable; the model-index and summary use the scalars.
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None}
    return make_model_card(
        model_id=model_id,
        dataset_name=dataset,
        class_names=class_names,
        recipe=recipe,
        metrics=scalars,
        hardware=hardware,
        base_model=base_model,
    )


def push_to_hub(
    model_dir: str | Path,
    repo_id: str,
    private: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
    api: Any = None,
) -> Any:
    """Uploads a saved APC model folder to ``repo_id`` in one commit.

    Args:
        model_dir: folder written by ``apc-train`` / ``save_pretrained`` (config.json + model.safetensors).
        repo_id: ``"user/name"`` (or ``"name"`` under the token's user); created if it does not exist.
        private: create the repository as private (an existing repository keeps its visibility).
        commit_message: defaults to ``"Upload APC model"``.
        token: Hub token; ``None`` uses ``HF_TOKEN`` or the cached ``hf auth login``.
        api: an ``huggingface_hub.HfApi``-like client (``create_repo``, ``create_commit``); built when ``None``.

    Returns:
        What ``api.create_commit`` returns (a ``CommitInfo`` with the commit URL for the real client).
    """
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.utils import validate_repo_id

    path = validate_model_dir(model_dir)
    validate_repo_id(repo_id)
    if not (path / "preprocessor_config.json").is_file():
        print(
            f"warning: {path} has no preprocessor_config.json; pipeline() will not be able to load the model",
            file=sys.stderr,
        )
    # The card is built before anything is created on the Hub, so a broken metrics.json fails early.
    card_id = repo_id
    card = None if (path / "README.md").is_file() else card_from_model_dir(path, card_id)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    # Passed per call as well, so an injected client gets the caller's token too; never stored on disk.
    auth = {"token": token} if token is not None else {}

    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model", **auth)
    # create_repo returns the full id (user/name) even when given a bare name.
    repo_id = getattr(repo_url, "repo_id", None) or repo_id
    if card is not None and card_id != repo_id:
        card = card_from_model_dir(path, repo_id)  # so the card's usage snippet names the full id

    operations = [CommitOperationAdd(path_in_repo=f.name, path_or_fileobj=str(f)) for f in _upload_files(path)]
    if card is not None:
        # Uploaded from memory: the user's folder is left untouched.
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
    return api.create_commit(
        repo_id=repo_id,
        operations=operations,
        commit_message=commit_message or "Upload APC model",
        repo_type="model",
        **auth,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="apc-push",
        allow_abbrev=False,  # a typo such as --privat must fail, not silently match --private
        description="Upload a trained APC model folder (weights, config, processor, model card, metrics) to the "
        "Hugging Face Hub.",
    )
    parser.add_argument("--model_dir", required=True, help="folder written by apc-train / save_pretrained")
    parser.add_argument("--repo_id", required=True, help="target repository, USER/NAME (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--commit_message", default=None, help='commit message [default: "Upload APC model"]')
    parser.add_argument(
        "--token", default=None, help="Hub token [default: the HF_TOKEN environment variable or the cached login]"
    )
    return parser


def main(argv: Sequence[str] | None = None, api: Any = None) -> int:
    """Console script ``apc-push``. ``api``: an injected client, for tests."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_model_dir(args.model_dir)
    except ValueError as err:
        parser.error(f"argument --model_dir: {err}")
    try:
        validate_repo_id(args.repo_id)
    except HFValidationError as err:
        parser.error(f"argument --repo_id: {str(err).splitlines()[0]}")
    try:
        commit = push_to_hub(
            args.model_dir, args.repo_id, args.private, args.commit_message, token=args.token, api=api
        )
    except Exception as err:  # network, auth, permission: one line, with the token masked if it was echoed
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        if args.token:
            message = message.replace(args.token, "***")
        raise SystemExit(f"apc-push: error: upload to {args.repo_id} failed: {message}")
    url = getattr(commit, "commit_url", None) or f"https://huggingface.co/{args.repo_id}"
    print(f"Uploaded {args.model_dir} to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
