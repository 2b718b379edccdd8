"""Recipe variants of the synthetic benchmark: `apc-train --recipe synthetic` plus a few flags, per seed.

    python bench/recipe_sweep.py --seeds 0,2 --jobs 2 --output_dir /tmp/sweep            # every variant below
    python bench/recipe_sweep.py --variants recipe,steps_1000 --seeds 0,2

Prints a markdown table of the final val decoder mIoU per seed, the per-class val IoU and the val mIoU at each
validation step. Runs already finished in --output_dir (folders `<variant>-s<seed>`) are reused, so the table can be
rebuilt without training again. This is where the recipe's choices were tried (docs/benchmarks.md, "Learning: what
bounds the synthetic benchmark"); bench/learning.py measures the chosen recipe and the pooling/PCL ablation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from apc_seg.train import RECIPES  # noqa: E402

RECIPE_OVERRIDES = RECIPES["synthetic"]["config_overrides"]
# The conv stem's initialisation before issue 8's fix (ViT's std 0.02; the recipe now uses He init): every conv-stem
# variant measured before the fix spells it out.
VIT_INIT = f"{RECIPE_OVERRIDES},conv_stem_init=vit"

# The first conv-stem recipe: 1000 steps, decoder from step 600 (the recipe now: 700 and 300). The PCL and AKP
# variants were tried on it and keep it as their base.
STEPS_1000 = ["--max_train_steps", "1000", "--seg_warmup_steps", "600", "--config_overrides", VIT_INIT]

# The conv-stem recipe of issue 6's grid (docs/benchmarks.md): 700 steps, decoder from step 300, learning rate 1e-3
# warmed up over 60 steps, no clipping, and the stem's convolutions at ViT's init (std 0.02). The stability variants
# of issue 8 keep it as their base.
STEM_INIT_VIT_700 = ["--max_train_steps", "700", "--seg_warmup_steps", "300", "--learning_rate", "1e-3",
                     "--warmup_steps", "60", "--config_overrides", VIT_INIT]

# The recipe before the convolutional stem: ViT's linear patch embedding, 1500 steps, decoder from step 600. The
# `linear*` variants are the ones tried on it (docs/benchmarks.md, "before the convolutional stem").
LINEAR_1500 = ["--backbone_stem", "patch", "--max_train_steps", "1500", "--seg_warmup_steps", "600"]

# name -> extra apc-train flags (config changes are appended to the recipe's --config_overrides; a repeated flag
# takes its last value). Each variant spells out its base, so it reruns as measured whatever the recipe becomes.
VARIANTS: dict[str, list[str]] = {
    "recipe": [],
    "steps_1000": STEPS_1000,
    "steps_1500": ["--max_train_steps", "1500", "--seg_warmup_steps", "600", "--config_overrides", VIT_INIT],
    "steps_1000_seg_warmup_300": ["--max_train_steps", "1000", "--seg_warmup_steps", "300",
                                  "--config_overrides", VIT_INIT],
    "pcl_weight_0.02": STEPS_1000 + ["--config_overrides", f"{VIT_INIT},pcl_loss_weight=0.02"],
    "pcl_no_push_low": STEPS_1000 + ["--config_overrides", f"{VIT_INIT},pcl_push_low=false"],
    "pcl_margin_0.3": STEPS_1000 + ["--config_overrides", f"{VIT_INIT},pcl_margin=0.3"],
    "akp_max_k_4": STEPS_1000 + ["--config_overrides", f"{VIT_INIT},akp_max_k=4"],
    "akp_ratio_0.9": STEPS_1000 + ["--config_overrides", f"{VIT_INIT},akp_ratio=0.9"],
    "stem_init_vit": STEM_INIT_VIT_700,
    "stem_init_vit_grad_clip_1": STEM_INIT_VIT_700 + ["--max_grad_norm", "1.0"],
    "stem_init_vit_lr_5e-4": STEM_INIT_VIT_700 + ["--learning_rate", "5e-4"],
    "linear": LINEAR_1500,
    "linear_train_images_8192": LINEAR_1500 + ["--num_train_images", "8192"],
    "linear_mae_1500_backbone_lr_0.1": ["--max_train_steps", "1500", "--seg_warmup_steps", "600",
                                        "--mae_pretrain_steps", "1500", "--backbone_lr_ratio", "0.1"],
    "linear_seg_weight_1": LINEAR_1500 + ["--config_overrides", f"{RECIPE_OVERRIDES},seg_loss_weight=1.0"],
    "linear_seg_weight_1_steps_3000": LINEAR_1500 + ["--config_overrides", f"{RECIPE_OVERRIDES},seg_loss_weight=1.0",
                                                     "--max_train_steps", "3000"],
    "linear_grad_clip_1": LINEAR_1500 + ["--max_grad_norm", "1.0"],
    "linear_no_par": LINEAR_1500 + ["--config_overrides", f"{RECIPE_OVERRIDES},pseudo_label_refine=none"],
    "linear_backbone_width_192": LINEAR_1500 + ["--backbone_overrides",
                                                "hidden_size=192,intermediate_size=384,num_attention_heads=6"],
}


def run(name: str, seed: int, args) -> dict:
    out = Path(args.output_dir) / f"{name}-s{seed}"
    if not (out / "metrics.json").is_file():
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // args.jobs)))
        cmd = [sys.executable, "-m", "apc_seg.train", "--recipe", "synthetic", "--seed", str(seed),
               "--output_dir", str(out), "--report_to", "none", *VARIANTS[name]]
        subprocess.run(cmd, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((out / "metrics.json").read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"Comma list of {list(VARIANTS)}.")
    p.add_argument("--seeds", default="0,2")
    p.add_argument("--jobs", type=int, default=1, help="Runs at once (each with cores/jobs torch threads).")
    p.add_argument("--output_dir", default="/tmp/apc-recipe-sweep")
    args = p.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        p.error(f"--variants: unknown {unknown}; expected some of {list(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    todo = [(name, seed) for name in names for seed in seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip(todo, pool.map(lambda job: run(*job, args), todo)))
    print("| variant | extra apc-train flags | seed | val mIoU | val IoU bg / stripes / dots / checker | "
          "val mIoU at each validation | s |")
    print("|---|---|---|---|---|---|---|")
    for name, seed in todo:
        m = results[(name, seed)]
        flags = " ".join(VARIANTS[name]).replace(RECIPE_OVERRIDES + ",", "...,") or "-"
        per_class = " / ".join(f"{100 * v:.0f}" for v in m["val_per_class_iou"].values())
        history = " ".join(f"{100 * h['val_miou']:.0f}" for h in m["val_history"])
        print(f"| {name} | `{flags}` | {seed} | {100 * m['val_miou']:.1f} | {per_class} | {history} | "
              f"{m['train_seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
