"""Class separability of CRAFTS samples with L_corr + L_cate on vs off (same seed, data, steps, base).

One demo dataset, one stage-1 model (autoencoder + weak-caption pretraining), then two stage-2 runs
that differ only in corr_weight / cate_weight. Each model draws the same number of samples per class
from the class-phrase prompt (same seeds); the ground-truth demo oracle (craft.evaluate.oracle: a CNN
trained on separately seeded demo images) reads them. Printed: oracle accuracy, macro per-class
accuracy, and the silhouette of the samples' oracle logits grouped by target class.

    .venv/bin/python bench/bench_crafts_losses.py --modality histo [--pre-steps 240 --ft-steps 1500]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modality", default="histo", choices=["histo", "cxr"])
    ap.add_argument("--n", type=int, default=400, help="demo images")
    ap.add_argument("--ae-steps", type=int, default=300)
    ap.add_argument("--pre-steps", type=int, default=240)
    ap.add_argument("--ft-steps", type=int, default=1500)
    ap.add_argument("--weight", type=float, default=0.1, help="corr_weight = cate_weight when on")
    ap.add_argument("--also", default="", help="more 'on' weights to compare, comma separated (e.g. 0.03,0.3)")
    ap.add_argument("--skip-off", action="store_true", help="only the 'on' runs (e.g. a second process)")
    ap.add_argument("--set", action="append", default=[], help="extra finetune override key=value (repeat)")
    ap.add_argument("--per-class", type=int, default=25, help="samples per class")
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32, help="batch size of every training step")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-crafts-losses"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from sklearn.metrics import silhouette_score

    from craft.config import load_stage_config
    from craft.data.demo import DemoConfig, generate
    from craft.data.manifest import read_meta
    from craft.evaluate.oracle import train_oracle
    from craft.models.diffusion import load_pipeline
    from craft.sample import generate as sample_images
    from craft.sample import to_array
    from craft.train import crafts

    out = args.out / args.modality
    data = out / "data"
    if not (data / "manifest.parquet").is_file():
        generate(DemoConfig(modality=args.modality, n=args.n, seed=args.seed), data)
    meta = read_meta(data)
    profile = f"demo-{args.modality}"
    common = [
        f"loop.seed={args.seed}",
        f"loop.threads={args.threads}",
        "sample_per_class=0",
        "loop.progress=false",
        f"loop.batch_size={args.batch}",
        f"autoencoder.batch_size={args.batch}",
    ]
    t0 = time.time()
    pre_dir = out / "pretrain"
    if not (pre_dir / "model_index.json").is_file():
        pre = load_stage_config(
            "pretrain", profile, common + [f"loop.steps={args.pre_steps}", f"autoencoder.steps={args.ae_steps}"]
        )
        crafts.pretrain(pre, data, pre_dir)
    print(f"stage 1 (autoencoder {args.ae_steps} + pretrain {args.pre_steps} steps): {time.time() - t0:.0f} s")
    oracle = train_oracle(args.modality, n=2000, out_dir=args.out / "oracle", epochs=8)
    print(f"oracle held-out accuracy: {oracle.meta['check_accuracy']:.3f}")

    results = {}
    runs = [] if args.skip_off else [("off", 0.0)]
    runs += [("on", args.weight)] + [(f"on-{w}", float(w)) for w in args.also.split(",") if w]
    tag = "".join(f"-{x.replace('=', '_')}" for x in args.set)  # a run with other settings gets its own folder
    for name, w in runs:
        ft_dir = out / f"finetune-{name}{tag if w else ''}"
        t1 = time.time()
        if not (ft_dir / "model_index.json").is_file():
            extra = [f"loop.steps={args.ft_steps}", f"corr_weight={w}", f"cate_weight={w}", *args.set]
            cfg = load_stage_config("finetune", profile, common + extra)
            crafts.finetune(cfg, data, ft_dir, base=str(pre_dir))
        train_s = time.time() - t1
        pipe = load_pipeline(ft_dir)
        labels, images = [], []
        for k, c in enumerate(meta.classes):
            imgs = sample_images(pipe, [meta.phrase(c)] * args.per_class, steps=20, guidance=args.guidance,
                                 seed=args.seed + k)  # fmt: skip
            images.append(to_array(imgs))
            labels += [k] * args.per_class
        x = np.concatenate(images)
        if oracle.meta["in_channels"] == 1:
            x = x[..., 0]
        y = np.array(labels)
        pred = oracle.predict(x)  # the raw reader: this bench predates the calibration (issue 20)
        acc = float((pred == y).mean())
        per_class = [float((pred[y == k] == k).mean()) for k in range(len(meta.classes))]
        logits = oracle.logits(x)
        sil = float(silhouette_score(logits, y)) if len(set(y)) > 1 else float("nan")
        results[name] = {"oracle_accuracy": acc, "per_class": per_class, "silhouette_oracle_logits": sil,
                         "finetune_seconds": train_s}  # fmt: skip
        print(f"L_corr+L_cate {name:>3} (weight {w}): oracle accuracy {acc:.3f}  per class "
              f"{[round(p, 2) for p in per_class]}  silhouette {sil:.3f}  (finetune {train_s:.0f} s)")  # fmt: skip
    if "off" not in results:
        print(json.dumps(results, indent=2))
        return
    on, off = results["on"], results["off"]
    print(
        f"ratio: crafts_losses_on_vs_off_oracle_accuracy = {on['oracle_accuracy'] / max(off['oracle_accuracy'], 1e-9):.3f}"
    )
    print(
        f"ratio: crafts_losses_on_minus_off_silhouette = {on['silhouette_oracle_logits'] - off['silhouette_oracle_logits']:.3f}"
    )
    (out / f"results{tag}.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **results}, indent=2)
    )


if __name__ == "__main__":
    main()
