"""The synthetic WSSS benchmark: does APC learn segmentation from image labels, and what does each part add?

    python bench/learning.py                                   # the full grid: 3 poolings x PCL off/on x 3 seeds
    python bench/learning.py --backbones recipe,patch,mae --backbone_variants adaptive_k+pcl --jobs 2
    python bench/learning.py --variants adaptive_k+pcl --seeds 0 --max_train_steps 300 --no_doc   # a smoke run
    python bench/learning.py --default_seeds 0,1,2,3,4,5,6,7,8,9,10,11 --backbones recipe,patch,mae \
        --backbone_variants adaptive_k+pcl --jobs 2                   # the docs' grid: the default on 12 seeds

Each run is `apc-train --recipe synthetic` (a tiny ViT from scratch, CPU) with only the variant's config changed, so
the table measures the recipe a user gets. Reported per variant, mean +- std over seeds:
- pseudo-label mIoU on train (the online pseudo-labels the decoder learns from, judged against the true masks) and on
  val (the same rule on the val images, so it can be compared with the decoder on the same images);
- decoder mIoU on val, and on the test split for the default variant (test is never used to choose anything);
- for the default variant, the decoder with the standard protocol (scales 1.0/1.25/1.5 + flip + dense CRF, as
  `apc-eval --scales 1.0,1.25,1.5 --flip --crf`; needs `apc-seg[crf]`) on val and test: the pseudo-labels are
  refined at pixel level (PAR) and the plain decoder is not, so this is the like-for-like comparison;
- two floors measured here on the same images: all-background, and "label fill" (every pixel gets the labelled
  foreground class with the largest mean pixel share in train images that carry it; background if unlabelled).
The markdown table goes to docs/benchmarks.md under "## Learning (synthetic WSSS benchmark)" (the rest of the file is
left alone) and a plot of val mIoU against step per variant to docs/learning_curves.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Learning (synthetic WSSS benchmark)"
DEFAULT_VARIANT = "adaptive_k+pcl"
ALL_VARIANTS = ["max", "max+pcl", "topk", "topk+pcl", "adaptive_k", "adaptive_k+pcl"]


def variant_overrides(name: str) -> str:
    pooling, _, pcl = name.partition("+")
    if pooling not in ("max", "topk", "adaptive_k") or pcl not in ("", "pcl"):
        raise SystemExit(f"bench/learning.py: unknown variant {name!r}; expected one of {ALL_VARIANTS}")
    return f"pooling={pooling}" + ("" if pcl else ",pcl_loss_weight=0.0")


# Backbone settings, each a set of rows: the recipe's from-scratch ViT (its convolutional stem), the same ViT with
# ViT's linear patch embedding, and that one MAE-pretrained first (a stem-less ViT is what apc-pretrain writes).
BACKBONES = {"recipe": "recipe (conv stem)", "patch": "linear patch embedding", "mae": "linear patch emb. + MAE"}


def backbone_flags(backbone: str, args) -> list[str]:
    if backbone == "recipe":
        return []
    if backbone == "patch":
        return ["--backbone_stem", "patch", "--mae_pretrain_steps", "0"]
    return ["--mae_pretrain_steps", str(args.mae_steps)]


def run_one(variant: str, backbone: str, seed: int, args) -> dict:
    from apc_seg.train import RECIPES

    recipe = RECIPES["synthetic"]
    out = Path(args.output_dir) / f"{variant}{'' if backbone == 'recipe' else '-' + backbone}-seed{seed}"
    metrics_file = out / "metrics.json"
    if not (args.reuse and metrics_file.is_file()):
        overrides = ",".join(filter(None, [recipe["config_overrides"], variant_overrides(variant)]))
        cmd = [sys.executable, "-m", "apc_seg.train", "--recipe", "synthetic", "--seed", str(seed),
               "--output_dir", str(out), "--report_to", "none", "--config_overrides", overrides,
               *backbone_flags(backbone, args)]
        if args.max_train_steps:
            cmd += ["--max_train_steps", str(args.max_train_steps)]
        start = time.time()
        env = dict(os.environ)
        if args.jobs > 1:  # parallel runs share the cores; one thread each (the LSTMs crawl when oversubscribed)
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
        subprocess.run(cmd, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL if args.quiet else None)
        wall = time.time() - start
        metrics = json.loads(metrics_file.read_text())
        metrics["wall_seconds"] = round(wall, 1)
        metrics_file.write_text(json.dumps(metrics, indent=2))
    return json.loads(metrics_file.read_text()) | {"output_dir": str(out)}


def label_fill_frequencies(train_set, num_labels: int) -> np.ndarray:
    """Mean pixel share of class c over the train images labelled with c (background: over all images)."""
    share, count = np.zeros(num_labels), np.zeros(num_labels)
    for row in train_set:
        mask = np.asarray(row["mask"])
        valid = mask != 255
        for c in [0] + list(row["class_labels"]):
            share[c] += (mask[valid] == c).mean()
            count[c] += 1
    return share / np.maximum(count, 1)


def floors(dataset, freq: np.ndarray, num_labels: int) -> dict:
    from apc_seg.metrics import confusion_matrix, miou_from_confusion

    cm_bg = torch.zeros(num_labels, num_labels, dtype=torch.long)
    cm_fill = torch.zeros_like(cm_bg)
    for row in dataset:
        mask = torch.from_numpy(np.asarray(row["mask"]).astype(np.int64))
        labels = list(row["class_labels"])
        fill = max(labels, key=lambda c: freq[c]) if labels else 0
        cm_bg += confusion_matrix(torch.zeros_like(mask), mask, num_labels)
        cm_fill += confusion_matrix(torch.full_like(mask, fill), mask, num_labels)
    return {"all_background": miou_from_confusion(cm_bg)["miou"], "label_fill": miou_from_confusion(cm_fill)["miou"]}


def judge(output_dir: str, seed: int, with_test: bool, reuse: bool, threads: int | None = None) -> dict:
    """Pseudo-labels on val, decoder on test (default variant only), and the floors of this run's seed.

    Written to `judge.json` in the run's folder; with `reuse`, a finished one is read back (the standard protocol's
    dense CRF is most of a default run's judging time)."""
    judge_file = Path(output_dir) / "judge.json"
    if reuse and judge_file.is_file():
        result = json.loads(judge_file.read_text())
        if not with_test or "test_miou" in result:
            return result
    if threads:
        torch.set_num_threads(threads)
    from apc_seg.data import make_synthetic
    from apc_seg.evaluation import STANDARD_PROTOCOL, evaluate
    from apc_seg.modeling_apc import APCForSemanticSegmentation
    from apc_seg.train import RECIPES

    recipe = RECIPES["synthetic"]
    # The same generator calls as apc-train (image i depends only on seed, split and i), plus the test split.
    data = make_synthetic(num_train=recipe["num_train_images"], num_val=recipe["num_val_images"], num_test=256,
                          image_size=recipe["crop_size"], seed=seed)
    freq = label_fill_frequencies(data["train"], 4)
    model = APCForSemanticSegmentation.from_pretrained(output_dir).eval()
    result = {"floors": {"val": floors(data["val"], freq, 4), "test": floors(data["test"], freq, 4)},
              "val_pseudo_miou": evaluate(model, data["val"], mode="pseudo")["miou"]}
    if with_test:
        test = evaluate(model, data["test"])
        result["test_miou"] = test["miou"]
        result["test_per_class_iou"] = test["per_class_iou"]
        result["val_standard_miou"] = evaluate(model, data["val"], **STANDARD_PROTOCOL)["miou"]
        result["test_standard_miou"] = evaluate(model, data["test"], **STANDARD_PROTOCOL)["miou"]
    judge_file.write_text(json.dumps(result, indent=2))
    return result


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    mean = 100 * statistics.fmean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} +- {std:.1f}"


def per_seed(values: list[float]) -> str:
    return " / ".join(f"{100 * v:.1f}" for v in values)


def make_table(rows: list[dict], seeds: list[int], cache: dict) -> str:
    lines = ["| variant | backbone | pseudo mIoU train | pseudo mIoU val | decoder mIoU val | decoder mIoU val per seed "
             "| final - best val | decoder mIoU test | test per seed | decoder val, standard protocol "
             "| decoder test, standard protocol | train s/run (APC loop, excl. MAE) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        runs = row["runs"]
        test = [r["test_miou"] for r in runs if "test_miou" in r]
        standard = {split: [r[f"{split}_standard_miou"] for r in runs if f"{split}_standard_miou" in r]
                    for split in ("val", "test")}
        gap = [r["val_miou"] - r["best_val_miou"] for r in runs]
        lines.append(
            f"| {row['variant']} | {BACKBONES[row['backbone']]} | "
            f"{mean_std([r['train_pseudo_miou'] for r in runs])} | {mean_std([r['val_pseudo_miou'] for r in runs])} | "
            f"{mean_std([r['val_miou'] for r in runs])} | {per_seed([r['val_miou'] for r in runs])} | "
            f"{mean_std(gap)} | {mean_std(test)} | {per_seed(test) if test else '-'} | "
            f"{mean_std(standard['val'])} | {mean_std(standard['test'])} | "
            f"{statistics.fmean(r['train_seconds'] for r in runs):.0f} |")
    floor_lines = ["", "Floors on the same images (mIoU, mean +- std over the seeds' datasets):", "",
                   "| floor | val | test |", "|---|---|---|"]
    for key, name in (("all_background", "all background"), ("label_fill", "label fill (image labels known)")):
        floor_lines.append(f"| {name} | {mean_std([cache[s]['val'][key] for s in seeds])} | "
                           f"{mean_std([cache[s]['test'][key] for s in seeds])} |")
    return "\n".join(lines + floor_lines)


def reliability_lines(rows: list[dict]) -> list[str]:
    """Issue 8's learning criteria for the default variant of each backbone, from the runs in the table."""
    out = ["Reliability of the default variant over its seeds (issue 8, AC2: median test mIoU >= 70, every "
           "foreground class test IoU >= 40 in every seed, final val within 5 points of the best):", ""]
    for row in rows:
        runs = [r for r in row["runs"] if "test_per_class_iou" in r]
        if not runs:
            continue
        worst = [min(v or 0.0 for v in r["test_per_class_iou"][1:]) for r in runs]
        gap = [r["best_val_miou"] - r["val_miou"] for r in runs]
        out.append(f"- {row['variant']}, {BACKBONES[row['backbone']]}, {len(runs)} seeds: median test mIoU "
                   f"{100 * statistics.median(r['test_miou'] for r in runs):.1f}, lowest test mIoU "
                   f"{100 * min(r['test_miou'] for r in runs):.1f}; worst foreground class per seed "
                   f"{per_seed(worst)} (lowest {100 * min(worst):.1f}); largest best - final val "
                   f"{100 * max(gap):.1f}")
    return out


def per_class_lines(rows: list[dict]) -> list[str]:
    from apc_seg.labels import SYNTHETIC_CLASSES

    out = []
    for row in rows:
        for run, seed in zip(row["runs"], row["seeds"]):
            if "test_per_class_iou" in run:
                ious = ", ".join(f"{name} {100 * (v or 0):.1f}"
                                 for name, v in zip(SYNTHETIC_CLASSES, run["test_per_class_iou"]))
                out.append(f"- {row['variant']}, {BACKBONES[row['backbone']]}, seed {seed}: test IoU {ious}")
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        histories = [r["val_history"] for r in row["runs"]]
        steps = [h["step"] for h in histories[0]]
        values = np.array([[h["val_miou"] for h in hist][: len(steps)] for hist in histories]) * 100
        label = f"{row['variant']}, {BACKBONES[row['backbone']]} (n={len(histories)})"
        ax.plot(steps, values.mean(0), marker="o", label=label)
        if len(histories) > 1:
            ax.fill_between(steps, values.min(0), values.max(0), alpha=0.15)
    ax.set_xlabel("training step")
    ax.set_ylabel("val decoder mIoU (%)")
    ax.set_title("apc-train --recipe synthetic: val mIoU (mean, band = min..max over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_section(doc: Path, body: str) -> None:
    text = doc.read_text() if doc.is_file() else "# Benchmarks\n"
    start = text.find(SECTION)
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + body.rstrip("\n") + "\n"
    else:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + body.rstrip("\n") + "\n" + (text[end:] if end != -1 else "")
    doc.write_text(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(ALL_VARIANTS), help=f"Comma list of {ALL_VARIANTS}.")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--default_seeds", default=None,
                   help=f"Seeds of the default variant ({DEFAULT_VARIANT}) with the recipe backbone (default: "
                        "--seeds): reliability is judged over more seeds than the ablation needs.")
    p.add_argument("--backbones", default="recipe",
                   help=f"Comma list of backbone settings, each a set of rows: {BACKBONES}.")
    p.add_argument("--backbone_variants", default=None,
                   help="Comma list: the variants that get the non-recipe backbone rows (default: all of --variants).")
    p.add_argument("--mae_steps", type=int, default=1500, help="MAE steps of the 'mae' backbone rows.")
    p.add_argument("--max_train_steps", type=int, default=None, help="Override the recipe's (shorter runs).")
    p.add_argument("--output_dir", default="/tmp/apc-learning")
    p.add_argument("--reuse", action="store_true", help="Reuse finished runs found in --output_dir.")
    p.add_argument("--doc", default=str(REPO / "docs" / "benchmarks.md"))
    p.add_argument("--plot", default=str(REPO / "docs" / "learning_curves.png"))
    p.add_argument("--no_doc", action="store_true", help="Print the table only.")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--jobs", type=int, default=1,
                   help="Train this many runs at once (each with cores/jobs torch threads); 2 on a 2-core machine "
                        "finishes the grid about 1.3x sooner than 1. Per-run seconds in the table are then under "
                        "sharing.")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    if set(backbones) - set(BACKBONES):
        p.error(f"--backbones: unknown {sorted(set(backbones) - set(BACKBONES))}; expected some of {list(BACKBONES)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    default_seeds = [int(s) for s in args.default_seeds.split(",")] if args.default_seeds else seeds
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    rows, cache, start = [], {}, time.time()
    backbone_variants = ([v.strip() for v in args.backbone_variants.split(",")] if args.backbone_variants
                         else variants)
    todo_rows = [(v, b) for b in backbones for v in variants if b == "recipe" or v in backbone_variants]

    def row_seeds(variant: str, backbone: str) -> list[int]:
        return default_seeds if (variant, backbone) == (DEFAULT_VARIANT, "recipe") else seeds

    reused = args.reuse
    todo = [(v, b, seed) for v, b in todo_rows for seed in row_seeds(v, b)]
    if args.jobs > 1:  # train everything first, N at a time; the line below then finds the finished runs
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(args.jobs) as pool:
            for future in [pool.submit(run_one, v, b, seed, args) for v, b, seed in todo]:
                future.result()
        args.reuse = True
    trained = {job: run_one(*job, args) for job in todo}
    # Judge N runs at once in processes of their own: the dense CRF runs on one core.
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = {job: pool.submit(judge, trained[job]["output_dir"], job[2], job[0] == DEFAULT_VARIANT, reused,
                                    threads) for job in todo}
        judged = {job: future.result() for job, future in futures.items()}
    for variant, backbone in todo_rows:
        runs = []
        for seed in row_seeds(variant, backbone):
            with_test = variant == DEFAULT_VARIANT
            run = trained[(variant, backbone, seed)] | judged[(variant, backbone, seed)]
            cache[seed] = run["floors"]
            runs.append(run)
            print(f"{variant}, {BACKBONES[backbone]}, seed {seed}: val {100 * run['val_miou']:.1f}, "
                  f"train pseudo {100 * run['train_pseudo_miou']:.1f}, val pseudo {100 * run['val_pseudo_miou']:.1f}"
                  + (f", test {100 * run['test_miou']:.1f} (standard protocol: val "
                     f"{100 * run['val_standard_miou']:.1f}, test {100 * run['test_standard_miou']:.1f})"
                     if with_test else "")
                  + f", {run['train_seconds']:.0f} s", flush=True)
        rows.append({"variant": variant, "backbone": backbone, "runs": runs, "seeds": row_seeds(variant, backbone)})
    table = make_table(rows, sorted(cache), cache)
    print(table)
    reliability = reliability_lines(rows)
    print("\n".join(reliability))
    if args.no_doc:
        return 0

    from apc_seg.train import RECIPES as R

    recipe = {k: v for k, v in R["synthetic"].items() if k not in ("output_dir",)}
    cpu = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores"
    not_run = [v for v in ALL_VARIANTS if v not in variants]
    other_backbones = ", ".join(BACKBONES[b] for b in backbones if b != "recipe")
    body = "\n".join([
        SECTION, "",
        f"Produced by `python bench/learning.py {' '.join(sys.argv[1:] if argv is None else argv)}` "
        f"({time.strftime('%Y-%m-%d')}, {cpu}, torch {torch.__version__}; this invocation took "
        f"{(time.time() - start) / 60:.1f} min"
        + (", reusing the finished runs in --output_dir; each run's own time is in the table" if reused else "")
        + (f"; {args.jobs} runs at a time" if args.jobs > 1 else "")
        + "). Every run is `apc-train --recipe synthetic` with the variant's "
        "config change only"
        + (f" and `--max_train_steps {args.max_train_steps}`" if args.max_train_steps else "") + ".",
        f"Recipe: `{json.dumps(recipe)}`.", "",
        f"Seeds: {', '.join(map(str, seeds))}"
        + (f"; the default variant with the recipe backbone: {', '.join(map(str, default_seeds))}"
           if default_seeds != seeds else "")
        + " (the seed also draws the synthetic dataset). "
        f"Variants run: {', '.join(variants)}; rows with other backbones ({other_backbones or 'none'}): "
        + (", ".join(backbone_variants) if other_backbones else "none") + "."
        + (f" Not run in this table: {', '.join(not_run)}." if not_run else ""), "",
        "mIoU in %, mean +- std over seeds. 'final - best val' is the final val mIoU minus the best seen at the "
        "validation steps. Test, and the standard protocol (scales 1.0/1.25/1.5 + flip + dense CRF), are scored for "
        "the default variant (adaptive_k+pcl) only.", "",
        table, "",
        *reliability, "",
        "Per-class test IoU of the default variant:", "",
        *per_class_lines(rows), "",
        f"![val mIoU against step]({Path(args.plot).name})", "",
    ])
    write_section(Path(args.doc), body)
    plot(rows, Path(args.plot))
    print(f"wrote {args.doc} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
