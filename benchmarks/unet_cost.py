"""Cost of the offline generator's UNet on this machine: raw pixels vs space-to-depth patches, one layer per block
vs more.

    python benchmarks/unet_cost.py --out results/unet_cost.csv
    python benchmarks/unet_cost.py --patch-sizes 2 --layers-per-block 1,2 --attention-head-dim 1 \
        --out results/unet_cost_depth.csv   # the Split-FMNIST CPU profile's UNet, one and two layers per block

For MNIST-sized images (1x28x28) it builds the package's ``DiffusionGenerator`` with the same UNet widths, each
``--patch-sizes`` (1: raw pixels, padded to 32; 2: 2x2 patches -> 4x16x16) and each ``--layers-per-block``, then
times a training step (forward + backward + AdamW, batch 64), a guided sampling step (batch 64, one batched UNet call
on 128 inputs: the conditional and unconditional halves, any scale but 1) and an unguided one (guidance scale 1: the
conditional call alone, 64 inputs). Times are medians of ``--repeats`` runs after a warm-up; run it with nothing else
on the machine. (The committed ``results/unet_cost.csv`` predates the ``layers_per_block``, ``attention_head_dim`` and
``unguided_*`` columns: it was one layer per block, 8-wide heads.)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from avalanche_drcpsd.experiments.compare import csv_list
from avalanche_drcpsd.generator import DiffusionGenerator
from avalanche_drcpsd.utils import atomic_write_csv


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(patch_size: int, channels, batch: int, repeats: int, context: int = 77, dim: int = 64,
            layers_per_block: int = 1, attention_head_dim: int = 8) -> dict:
    torch.manual_seed(0)
    gen = DiffusionGenerator.build(image_shape=(1, 28, 28), cross_attention_dim=dim, block_out_channels=channels,
                                   patch_size=patch_size, layers_per_block=layers_per_block,
                                   attention_head_dim=attention_head_dim)
    opt = torch.optim.AdamW(gen.unet.parameters(), lr=1e-3)
    x = torch.rand(batch, 1, 28, 28)
    cond = torch.randn(batch, context, dim)

    def train_step():
        loss = gen.training_loss(x, cond)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def sample_step(scale: float):
        gen.sample(cond, torch.zeros(context, dim), guidance_scale=scale, num_inference_steps=1)

    train_s = _median_time(train_step, repeats)
    sample_s = _median_time(lambda: sample_step(3.0), repeats)
    unguided_s = _median_time(lambda: sample_step(1.0), repeats)
    return {"patch_size": patch_size, "model_input": "x".join(map(str, gen.spec.latent_shape)),
            "block_out_channels": "-".join(map(str, channels)), "layers_per_block": layers_per_block,
            "attention_head_dim": attention_head_dim,
            "parameters_M": round(sum(p.numel() for p in gen.parameters()) / 1e6, 2), "batch": batch,
            "train_step_s": round(train_s, 3), "train_images_per_s": round(batch / train_s, 1),
            "guided_unet_call_s": round(sample_s, 3), "guided_images_per_s_per_step": round(batch / sample_s, 1),
            "unguided_unet_call_s": round(unguided_s, 3),
            "unguided_images_per_s_per_step": round(batch / unguided_s, 1),
            "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/unet_cost.csv")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--patch-sizes", default=[1, 2], type=lambda s: csv_list(s, int),
                        help="comma-separated patch sizes (default: 1,2)")
    parser.add_argument("--layers-per-block", default=[1], type=lambda s: csv_list(s, int),
                        help="comma-separated UNet layers per block (default: 1)")
    parser.add_argument("--attention-head-dim", type=int, default=8,
                        help="the UNet's attention head dim (the package default 8; the CPU profiles use 1)")
    args = parser.parse_args(argv)
    patches, layers = args.patch_sizes, args.layers_per_block
    if min(patches + layers) < 1 or args.attention_head_dim < 1:
        parser.error(f"patch sizes {patches}, layers per block {layers} and --attention-head-dim "
                     f"{args.attention_head_dim} must all be >= 1")
    rows = [measure(p, (32, 64, 64), args.batch, args.repeats, layers_per_block=n,
                    attention_head_dim=args.attention_head_dim) for p in patches for n in layers]
    for row in rows:
        print(row, flush=True)

    atomic_write_csv(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
