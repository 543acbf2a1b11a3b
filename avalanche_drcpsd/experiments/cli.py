"""Two commands around a generator directory and an embedding buffer.

``drcpsd-train-cpsd GENERATOR IMAGES --out embeddings.safetensors``
    Learns one CPSD projection per class of an image folder laid out ``IMAGES/<class_name>/*.png|jpg`` (class ids:
    the folders in sorted order; prompt: ``--prompt-template`` with the folder name, ``_`` read as a space) with the
    generator frozen, and writes the embedding buffer (safetensors).

``drcpsd-sample GENERATOR EMBEDDINGS --class 0 --class 3 --num-samples 64 --out synthetic``
    Generates images of classes of an embedding buffer into the synthetic cache layout
    ``OUT/task_<k>/<class>/<idx>.png`` + ``manifest.json`` (an existing matching task is reused, not regenerated),
    and a grid ``OUT/grid_task_<k>.png`` (one row per class).

``GENERATOR`` is a Stable Diffusion pipeline directory (diffusers layout, local files only) or the offline
generator's ``DiffusionGenerator.save_pretrained`` folder (e.g. ``runs/<name>/state/generator``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ..config import ConfigError, DRCPSDConfig, check_prompt_template
from ..generator import GeneratorError
from ..text_encoders import TextEncoderError
from ..utils import atomic_write

__all__ = ["sample_main", "train_cpsd_main", "load_image_folder"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


# --------------------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------------------
def _existing_dir(value: str) -> str:
    if not os.path.isdir(value):
        raise argparse.ArgumentTypeError(f"directory {value!r} does not exist")
    return value


def _existing_file(value: str) -> str:
    if not os.path.isfile(value):
        raise argparse.ArgumentTypeError(f"file {value!r} does not exist")
    return value


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} must be >= 1")
    return number


def _add_generator_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("generator", type=_existing_dir,
                        help="a Stable Diffusion pipeline directory or a DiffusionGenerator.save_pretrained folder")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="weights dtype (Stable Diffusion; the offline generator stays float32 on the CPU)")
    parser.add_argument("--resolution", type=_positive_int, help="Stable Diffusion: side of the generated images "
                        "(default: the pipeline's native resolution)")
    parser.add_argument("--compile", action="store_true", help="Stable Diffusion: torch.compile the UNet")
    parser.add_argument("--offload", action="store_true",
                        help="Stable Diffusion: keep only the network in use on the device")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _load_generator(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """The generator of ``args.generator`` and the config ``generator`` kind it is."""
    from ..sd import StableDiffusionGenerator, load_generator

    try:
        gen = load_generator(args.generator, device=args.device, torch_dtype=args.dtype, resolution=args.resolution,
                             compile_unet=args.compile, offload=args.offload)
    except (GeneratorError, TextEncoderError) as exc:
        parser.error(str(exc))
    kind = "stable_diffusion" if isinstance(gen, StableDiffusionGenerator) else "unet"
    return gen, kind


def _config(parser: argparse.ArgumentParser, **values: Any) -> DRCPSDConfig:
    try:
        return DRCPSDConfig(**values)
    except ConfigError as exc:
        parser.error(str(exc))


def _image_shape(gen) -> Tuple[int, int, int]:
    return tuple(gen.image_shape)


# --------------------------------------------------------------------------------------------------------
# drcpsd-train-cpsd
# --------------------------------------------------------------------------------------------------------
def load_image_folder(root: os.PathLike, image_shape: Sequence[int],
                      max_per_class: Optional[int] = None) -> Tuple[Tensor, Tensor, List[str]]:
    """``(images, labels, class_names)`` of ``root/<class_name>/*.png|jpg|jpeg``: images resized to ``(H, W)``
    (bilinear), grayscale for ``C = 1`` else RGB, in [0, 1]; class ids are the folders' sorted order.

    Raises:
        FileNotFoundError: ``root`` has no class folder, or a class folder has no image.
    """
    from PIL import Image

    c, h, w = (int(v) for v in image_shape)
    root = Path(root)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise FileNotFoundError(f"image folder {str(root)!r} has no class sub-folder; expected "
                                "<root>/<class_name>/*.png|jpg")
    images, labels = [], []
    for label, folder in enumerate(folders):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:max_per_class]
        if not files:
            raise FileNotFoundError(f"class folder {str(folder)!r} has no .png/.jpg/.jpeg image")
        for path in files:
            with Image.open(path) as pil:
                array = np.asarray(pil.convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR))
            images.append(torch.from_numpy(array.reshape(h, w, c).copy()).permute(2, 0, 1).float() / 255.0)
            labels.append(label)
    return torch.stack(images), torch.tensor(labels), [f.name.replace("_", " ") for f in folders]


def _text_encoder_spec(value: Optional[str]):
    """``--text-encoder``: a JSON spec, or a directory (a transformers CLIPTextModel); None: the default."""
    if value is None:
        return None
    if os.path.isdir(value):
        return {"kind": "hf_clip", "path": value}
    try:
        spec = json.loads(value)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"--text-encoder {value!r} is neither a directory nor a JSON spec") from None
    if not isinstance(spec, dict):
        raise argparse.ArgumentTypeError(f"--text-encoder {value!r} must be a JSON object")
    return spec


def train_cpsd_main(argv: Optional[Sequence[str]] = None) -> int:
    """``drcpsd-train-cpsd``: learn CPSD embeddings for the classes of an image folder, write the buffer."""
    parser = argparse.ArgumentParser(prog="drcpsd-train-cpsd", description=train_cpsd_main.__doc__.split(": ", 1)[1])
    _add_generator_arguments(parser)
    parser.add_argument("images", type=_existing_dir, help="image folder: <images>/<class_name>/*.png|jpg")
    parser.add_argument("--out", default="embeddings.safetensors", help="embedding buffer file to write")
    parser.add_argument("--epochs", type=_positive_int, default=1, help="CPSD epochs per class (reference: 1)")
    parser.add_argument("--lr", type=float, default=1e-4,
                        help="CPSD learning rate (the original code: 4e-4, i.e. 1e-4 x batch 4)")
    parser.add_argument("--batch-size", type=_positive_int, default=4, help="CPSD batch size (reference: 4)")
    parser.add_argument("--prompt-template", default="a photo of a {}", help="class prompt, '{}' = class name")
    parser.add_argument("--lambda-mmd", type=float, default=0.003, help="weight of the MMD term (reference 0.003)")
    parser.add_argument("--mmd-kind", choices=["mean", "gaussian"], default="mean")
    parser.add_argument("--projection", choices=["token", "hidden"], default="token")
    parser.add_argument("--max-images-per-class", type=_positive_int, help="cap on the images read per class")
    parser.add_argument("--text-encoder", type=_text_encoder_spec, help="text encoder: a JSON spec (see "
                        "load_text_encoder) or a CLIPTextModel directory; default: the Stable Diffusion pipeline's "
                        "own, or the package's offline default encoder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        check_prompt_template(args.prompt_template)
    except ConfigError as exc:
        parser.error(str(exc))
    gen, kind = _load_generator(parser, args)
    try:
        images, labels, names = load_image_folder(args.images, _image_shape(gen), args.max_images_per_class)
    except (FileNotFoundError, OSError) as exc:
        parser.error(str(exc))
    config = _config(parser, generator=kind, generator_path=args.generator, text_encoder=args.text_encoder,
                     prompt_template=args.prompt_template, projection=args.projection, cpsd_epochs=args.epochs,
                     cpsd_lr=args.lr, cpsd_batch_size=args.batch_size, lambda_mmd=args.lambda_mmd,
                     mmd_kind=args.mmd_kind, generator_steps=0, cpsd_order="before_generator", seed=args.seed,
                     device=args.device)
    from ..plugins.generator import CPSDGeneratorPlugin

    torch.manual_seed(args.seed)
    plugin = CPSDGeneratorPlugin(config, class_names=names, generator=gen, verbose=not args.quiet)
    try:
        plugin.learn_classes(images, labels)  # generator_steps=0 and a frozen generator: CPSD projections only
    except TextEncoderError as exc:
        parser.error(f"{exc} (--text-encoder selects the encoder the generator was trained with)")
    except GeneratorError as exc:
        parser.error(str(exc))
    plugin.buffer.save(args.out)
    for cls in plugin.buffer.classes:
        print(f"class {cls}: {plugin.buffer.prompts[cls]!r} ({int((labels == cls).sum())} images)")
    print(f"embedding buffer written to {args.out}")
    return 0


# --------------------------------------------------------------------------------------------------------
# drcpsd-sample
# --------------------------------------------------------------------------------------------------------
def sample_main(argv: Optional[Sequence[str]] = None) -> int:
    """``drcpsd-sample``: generate images of buffer classes into the synthetic cache layout, plus a grid."""
    parser = argparse.ArgumentParser(prog="drcpsd-sample", description=sample_main.__doc__.split(": ", 1)[1])
    _add_generator_arguments(parser)
    parser.add_argument("embeddings", type=_existing_file, help="embedding buffer (.safetensors) written by "
                        "drcpsd-train-cpsd or a DR-CPSD run (state/embeddings.safetensors)")
    parser.add_argument("--class", dest="classes", type=int, action="append",
                        help="class id to sample (repeatable; default: every class of the buffer)")
    parser.add_argument("--num-samples", type=_positive_int, default=8, help="images per class (default 8)")
    parser.add_argument("--out", default="synthetic", help="cache directory (default ./synthetic)")
    parser.add_argument("--task", type=int, default=0, help="the task_<k> folder to write (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="class c uses seed + c")
    parser.add_argument("--guidance", type=float, nargs="+", default=[5.0, 9.0], metavar="W",
                        help="a guidance scale, or LOW HIGH for U(LOW, HIGH) per image (default 5 9, the reference)")
    parser.add_argument("--steps", type=_positive_int, default=20, help="sampling steps (default 20)")
    parser.add_argument("--sampler", choices=["dpm", "ddim"], default="dpm")
    parser.add_argument("--batch-size", type=_positive_int, default=16, help="images per sampling batch")
    parser.add_argument("--image-shape", type=_positive_int, nargs=3, metavar=("C", "H", "W"),
                        help="Stable Diffusion: the output images' shape, C 1 or 3 (default 3 x resolution^2)")
    args = parser.parse_args(argv)
    if len(args.guidance) not in (1, 2):
        parser.error(f"--guidance takes one scale or LOW HIGH, got {args.guidance}")
    from ..cpsd import EmbeddingBuffer

    try:
        buffer = EmbeddingBuffer.load(args.embeddings)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    classes = args.classes if args.classes else buffer.classes
    missing = [c for c in classes if c not in buffer]
    if missing:
        parser.error(f"classes {missing} are not in the embedding buffer {args.embeddings!r} "
                     f"(it holds {buffer.classes})")
    if buffer.null is None:
        parser.error(f"the embedding buffer {args.embeddings!r} has no null embedding (needed for guidance)")
    gen, kind = _load_generator(parser, args)
    if args.image_shape is not None:
        try:
            gen.set_output_shape(args.image_shape)
        except GeneratorError as exc:
            parser.error(f"--image-shape only applies to a generator that takes the classifier's shape (a Stable "
                         f"Diffusion pipeline): {exc}")
    width = gen.unet.config.cross_attention_dim
    if buffer.null.shape[-1] != width:
        parser.error(f"the embeddings in {args.embeddings!r} are {buffer.null.shape[-1]}-d but the generator's "
                     f"cross-attention takes {width}-d conditions: they were made for another generator")
    guidance = args.guidance[0] if len(args.guidance) == 1 else tuple(args.guidance)
    config = _config(parser, generator=kind, generator_path=args.generator, guidance_scale=guidance,
                     sampling_steps=args.steps, sampler=args.sampler, sample_batch_size=args.batch_size,
                     seed=args.seed, device=args.device, synthetic_cache_dir=args.out)
    from ..plugins.generator import CPSDGeneratorPlugin
    from ..synthetic_cache import SyntheticCacheError
    from .run import _image_grid

    plugin = CPSDGeneratorPlugin(config, generator=gen, verbose=not args.quiet)
    plugin.buffer = buffer
    try:
        x, y = plugin.sample_cached(classes, args.num_samples, task=args.task, seed=args.seed,
                                    desc=f"sampling {len(classes)} classes")
    except SyntheticCacheError as exc:
        parser.error(str(exc))
    grid = os.path.join(args.out, f"grid_task_{args.task}.png")
    picture = _image_grid(x, y, min(args.num_samples, 16))
    atomic_write(grid, lambda tmp: picture.save(tmp, format="PNG"))
    print(f"{len(y)} images of classes {list(classes)} in {plugin.cache.task_dir(args.task)}; grid: {grid}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(sample_main())
