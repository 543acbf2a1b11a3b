"""Cost of the offline generator's UNet on this machine: raw pixels vs space-to-depth patches.

    python benchmarks/unet_cost.py --out results/unet_cost.csv

For MNIST-sized images (1x28x28) it builds the package's ``DiffusionGenerator`` with the same UNet widths and
``patch_size`` 1 (raw pixels, padded to 32) and 2 (2x2 patches -> 4x16x16), then times a training step
(forward + backward + AdamW, batch 64) and a guided sampling call (batch 64, one step = one batched UNet call on
128 inputs). Times are medians of ``--repeats`` runs after a warm-up; run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

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


def measure(patch_size: int, channels, batch: int, repeats: int, context: int = 77, dim: int = 64) -> dict:
    torch.manual_seed(0)
    gen = DiffusionGenerator.build(image_shape=(1, 28, 28), cross_attention_dim=dim, block_out_channels=channels,
                                   patch_size=patch_size)
    opt = torch.optim.AdamW(gen.unet.parameters(), lr=1e-3)
    x = torch.rand(batch, 1, 28, 28)
    cond = torch.randn(batch, context, dim)

    def train_step():
        loss = gen.training_loss(x, cond)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def sample_step():
        gen.sample(cond, torch.zeros(context, dim), guidance_scale=3.0, num_inference_steps=1)

    train_s = _median_time(train_step, repeats)
    sample_s = _median_time(sample_step, repeats)
    return {"patch_size": patch_size, "model_input": "x".join(map(str, gen.spec.latent_shape)),
            "block_out_channels": "-".join(map(str, channels)),
            "parameters_M": round(sum(p.numel() for p in gen.parameters()) / 1e6, 2), "batch": batch,
            "train_step_s": round(train_s, 3), "train_images_per_s": round(batch / train_s, 1),
            "guided_unet_call_s": round(sample_s, 3), "guided_images_per_s_per_step": round(batch / sample_s, 1),
            "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/unet_cost.csv")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args(argv)
    rows = [measure(p, (32, 64, 64), args.batch, args.repeats) for p in (1, 2)]
    for row in rows:
        print(row, flush=True)

    atomic_write_csv(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
