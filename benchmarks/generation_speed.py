"""Replay-generation speed: the package's sampling path vs diffusers' own StableDiffusionPipeline call, same weights.

    python benchmarks/generation_speed.py --device cuda --dtype bfloat16 --batch-size 64 \\
        --out results/generation_speed.csv
    python benchmarks/generation_speed.py --smoke --device cpu --out /tmp/generation_speed.csv   # a quick CPU check

Models (random weights: speed does not depend on their values), built in this process:

* ``offline``: the package's default generator (``DiffusionGenerator`` with ``DRCPSDConfig``'s defaults: UNet
  (32, 64, 64), 2x2 space-to-depth patches, 64-d text states) for 1x28x28 (the main job) and 3xSxS per ``--sizes``;
* ``sd``: a small Stable-Diffusion-shaped latent model (:func:`save_random_pipeline` below: VAE with
  factor 8 and 4 latent channels, 4-level UNet with cross-attention on all levels but the last, 2 layers per block,
  a CLIP text encoder) at each ``--sizes`` S (default 32 and 64 px), loaded from its pipeline directory.

For each model, in the same run and on the same weights:

* ``package``: the replay path, ``generator.sample``: DPM-Solver++ with ``--steps`` steps, classifier-free guidance with
  a scale drawn from U(5, 9) per image, the conditional and unconditional branches in one batched UNet call,
  ``--batch-size`` images per call, images returned as tensors in [0, 1];
* ``diffusers``: ``StableDiffusionPipeline.__call__`` with its default settings (the scheduler saved with the weights,
  PNDM for ``sd``; 50 steps; guidance 7.5; PIL output) on ``prompt_embeds``/``negative_prompt_embeds`` of
  ``--batch-size`` images. For ``offline`` the pipeline wraps the offline UNet with no VAE and ``output_type="latent"``
  (diffusers has no pipeline for a pixel-space text-conditioned UNet; the space-to-depth decode is a reshape).

Columns: images/s end to end (decode included), UNet evaluations per image, seconds per image per step (comparable
across the two step counts), peak CUDA memory. With ``--dtype`` other than float32 the ``sd`` weights are cast (both
paths) and the ``offline`` model runs under ``torch.autocast``. Run it with nothing else on the machine; the CSV is
written atomically to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Union

import diffusers
import torch
from diffusers import DDPMScheduler

from avalanche_drcpsd.config import DRCPSDConfig
from avalanche_drcpsd.generator import DiffusionGenerator
from avalanche_drcpsd.sd import StableDiffusionGenerator, parse_dtype
from avalanche_drcpsd.utils import atomic_write_csv

DIFFUSERS_DEFAULT_STEPS, DIFFUSERS_DEFAULT_GUIDANCE = 50, 7.5



def save_random_pipeline(
    directory: Union[str, os.PathLike],
    *,
    resolution: int = 16,
    unet_channels: Sequence[int] = (16, 32),
    layers_per_block: int = 1,
    vae_channels: Sequence[int] = (8, 16),
    text_hidden_size: int = 32,
    text_layers: int = 1,
    attention_head_dim: int = 4,
    prediction_type: str = "epsilon",
    seed: int = 0,
) -> Path:
    """Write a Stable-Diffusion-shaped pipeline with RANDOM weights (for tests and timing, never for images): an
    ``AutoencoderKL`` (4 latent channels, factor ``2**(len(vae_channels)-1)``), a ``UNet2DConditionModel`` with
    cross-attention on every level but the last (as SD), a ``CLIPTextModel`` with the real CLIP BPE tokenizer
    (built offline from open_clip's vocabulary), and SD's ``PNDMScheduler`` (scaled-linear betas 0.00085-0.012),
    assembled into a ``StableDiffusionPipeline`` and saved with ``save_pretrained``. Nothing is downloaded."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from avalanche_drcpsd.text_encoders import CLIP_CONTEXT_LENGTH, CLIP_VOCAB_SIZE, build_clip_tokenizer

    groups = 8 if all(c % 8 == 0 for c in (*unet_channels, *vae_channels)) else 1
    factor = 2 ** (len(vae_channels) - 1)
    levels = len(unet_channels)
    down = tuple("CrossAttnDownBlock2D" if i < levels - 1 or levels == 1 else "DownBlock2D" for i in range(levels))
    up = tuple(d.replace("Down", "Up") for d in reversed(down))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(vae_channels),
                            down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
                            up_block_types=("UpDecoderBlock2D",) * len(vae_channels), layers_per_block=1,
                            norm_num_groups=groups, sample_size=resolution)
        unet = UNet2DConditionModel(sample_size=resolution // factor, in_channels=4, out_channels=4,
                                    block_out_channels=tuple(unet_channels), layers_per_block=layers_per_block,
                                    down_block_types=down, up_block_types=up, cross_attention_dim=text_hidden_size,
                                    attention_head_dim=attention_head_dim, norm_num_groups=groups)
        tokenizer = build_clip_tokenizer()
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE, hidden_size=text_hidden_size, intermediate_size=4 * text_hidden_size,
            num_hidden_layers=text_layers, num_attention_heads=max(1, text_hidden_size // 64),
            max_position_embeddings=CLIP_CONTEXT_LENGTH, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
                              prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    out = Path(os.fspath(directory))
    pipe.save_pretrained(str(out), safe_serialization=True)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    fn()  # warm-up (and compilation with --compile)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    return time.perf_counter() - start


def _autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for the float32 offline model (its sampler keeps float32 noise and latents)."""
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


def _pipeline(unet, scheduler, vae=None, text_encoder=None, tokenizer=None):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _row(model: str, shape, params: float, method: str, steps: int, guidance: str, args, images: int,
         seconds: float, device: torch.device) -> Dict[str, object]:
    evals = 2 * steps  # guided: conditional + unconditional per step
    return {
        "model": model, "image_shape": "x".join(map(str, shape)), "unet_parameters_M": round(params, 2),
        "method": method, "steps": steps, "guidance": guidance, "batch": args.batch_size, "images": images,
        "seconds": round(seconds, 4), "images_per_s": round(images / seconds, 3),
        "unet_evals_per_image": evals, "s_per_image_step": round(seconds / images / steps, 6),
        "peak_cuda_MB": round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1) if device.type == "cuda" else "",
        "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "",
        "dtype": args.dtype, "compile": args.compile, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "diffusers": diffusers.__version__,
    }


def bench_offline(shape, args, device: torch.device) -> List[Dict[str, object]]:
    """(a) the offline default generator: package sampler vs the diffusers pipeline loop on the same UNet."""
    defaults = DRCPSDConfig()
    channels = (8, 16) if args.smoke else defaults.unet_block_out_channels
    width = 16 if args.smoke else 64
    torch.manual_seed(0)
    gen = DiffusionGenerator.build(image_shape=shape, cross_attention_dim=width, block_out_channels=channels,
                                   patch_size=defaults.patch_size).to(device).eval()
    if args.compile:
        gen.unet = torch.compile(gen.unet)
    b = args.batch_size
    cond = torch.randn(b, 77, width, device=device)
    null = torch.randn(77, width, device=device)
    params = sum(p.numel() for p in gen.unet.parameters()) / 1e6
    dtype = parse_dtype(args.dtype)
    calls = max(1, args.num_images // b)
    rows = []

    def package():
        with _autocast(device, dtype):
            return gen.sample(cond, null, guidance_scale=(5.0, 9.0), num_inference_steps=args.steps,
                              generator=torch.Generator().manual_seed(0))

    seconds = _timed(package, calls, device)
    rows.append(_row("offline", shape, params, "package", args.steps, "U(5,9)", args, calls * b, seconds, device))

    pipe = _pipeline(gen.unet, DDPMScheduler.from_config(gen.noise_scheduler.config))  # the scheduler saved with it
    side = gen.spec.latent_shape[1]
    steps = args.diffusers_steps

    def pipeline():
        with _autocast(device, dtype):
            z = pipe(prompt_embeds=cond, negative_prompt_embeds=null.expand(b, -1, -1), height=side * 8, width=side * 8,
                     num_inference_steps=steps, guidance_scale=DIFFUSERS_DEFAULT_GUIDANCE, output_type="latent").images
            return gen.decode(z)

    seconds = _timed(pipeline, calls, device)
    rows.append(_row("offline", shape, params, "diffusers", steps, str(DIFFUSERS_DEFAULT_GUIDANCE), args, calls * b,
                     seconds, device))
    return rows


def bench_sd(size: int, args, device: torch.device, workdir: Path) -> List[Dict[str, object]]:
    """(b) a small SD-shaped latent model at ``size`` px: package sampler vs StableDiffusionPipeline's default call."""
    from diffusers import StableDiffusionPipeline

    if args.smoke:
        shape_kw = dict(unet_channels=(8, 8, 16, 16), layers_per_block=1, vae_channels=(8, 8, 8, 8),
                        text_hidden_size=16, attention_head_dim=4)
    else:
        shape_kw = dict(unet_channels=(128, 256, 512, 512), layers_per_block=2, vae_channels=(64, 128, 256, 256),
                        text_hidden_size=768, attention_head_dim=8)
    directory = save_random_pipeline(workdir / f"sd{size}", resolution=size, **shape_kw)
    dtype = parse_dtype(args.dtype)
    gen = StableDiffusionGenerator.from_pretrained(directory, device=device, torch_dtype=dtype,
                                                   compile_unet=args.compile, vae_batch_size=args.batch_size)
    text = gen.load_text_encoder()
    b = args.batch_size
    cond = text.encode(["a photo of a dog"]).expand(b, -1, -1)
    null = text.null_embedding()
    params = sum(p.numel() for p in gen.unet.parameters()) / 1e6
    calls = max(1, args.num_images // b)
    rows = []

    def package():
        return gen.sample(cond, null, guidance_scale=(5.0, 9.0), num_inference_steps=args.steps,
                          generator=torch.Generator().manual_seed(0))

    seconds = _timed(package, calls, device)
    rows.append(_row("sd", (3, size, size), params, "package", args.steps, "U(5,9)", args, calls * b, seconds, device))
    gen = None  # free its memory before the pipeline loads
    pipe = StableDiffusionPipeline.from_pretrained(str(directory), local_files_only=True, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    if args.compile:
        pipe.unet = torch.compile(pipe.unet)
    cond_p, null_p = cond.to(device, dtype), null.to(device, dtype).expand(b, -1, -1)
    steps = args.diffusers_steps

    def pipeline():
        return pipe(prompt_embeds=cond_p, negative_prompt_embeds=null_p, num_inference_steps=steps,
                    guidance_scale=DIFFUSERS_DEFAULT_GUIDANCE).images

    seconds = _timed(pipeline, calls, device)
    rows.append(_row("sd", (3, size, size), params, "diffusers", steps, str(DIFFUSERS_DEFAULT_GUIDANCE), args,
                     calls * b, seconds, device))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/generation_speed.csv")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-images", type=int, default=256, help="timed images per row (after a warm-up batch)")
    parser.add_argument("--steps", type=int, default=20, help="package sampler steps (reference: 20)")
    parser.add_argument("--diffusers-steps", type=int, default=DIFFUSERS_DEFAULT_STEPS,
                        help="steps of the diffusers call (its default: 50)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="image sides of the SD-shaped model")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNets (both paths)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny models, 2 images, 2 steps each: checks the script, measures nothing useful")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch_size, args.num_images, args.steps, args.diffusers_steps = 2, 2, 2, 2
        args.sizes = args.sizes[:1] if args.sizes == [32, 64] else args.sizes
    device = torch.device(args.device)
    rows: List[Dict[str, object]] = []
    offline_shapes = [(1, 28, 28)] + [(3, s, s) for s in args.sizes]
    for shape in offline_shapes[:1] if args.smoke else offline_shapes:
        rows += bench_offline(shape, args, device)
        print(*rows[-2:], sep="\n", flush=True)
    with tempfile.TemporaryDirectory(prefix="drcpsd-genspeed-") as workdir:
        for size in args.sizes:
            rows += bench_sd(size, args, device, Path(workdir))
            print(*rows[-2:], sep="\n", flush=True)

    atomic_write_csv(args.out, rows)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
