"""The classifier side of DR-CPSD alone: dream replay from fixed synthetic sets, in seconds per run.

    python benchmarks/replay_quality.py --sets results/generator/default/profile_sets.pt --variants base,seen \\
        --seeds 0,1,2

``benchmarks/generator_quality.py`` measures the generator and saves the last replay set it drew
(``<variant>_sets.pt``: 8-bit images of every class, as the synthetic cache keeps them). This benchmark trains the
classifier continually on the same benchmark with the real ``DRCPSD`` strategy whose generator is replaced by those
sets (:class:`KeptSets`): the classifier phase, the averaged student, the isolation loss and the teachers'
distillation are the package's own code, only the generator phase is skipped. With ``replay_draw="once"`` a run's
replay sets are exactly such fixed sets, so the accuracy here is what DR-CPSD would reach with that generator; with
``redraw`` it is an upper bound (no drift after a class is learned).

``--real BENCHMARK`` replays *real* training images instead (``--real-per-class`` of each class, drawn with
``--real-seed``; the sets are named ``real<n>_seed<k>``): the accuracy dream replay reaches with a perfect
generator keeping that many images per class, the ceiling of a benchmark's kept sets.

Variants (``benchmarks/replay_variants.json``) set ``DRCPSDConfig`` fields, and ``ExperimentConfig`` fields under
``"_experiment"``, on top of the sets' benchmark recipe (the main job's for ``default``, else the CPU profile).
Each run appends one row to ``<out>/<benchmark>/ablation.csv``: variant, seed, final average accuracy, the
accuracy of each experience's classes after the last one and of each class (``per_class``: the diagonal of the
final model's confusion over its rows), replay seconds.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import time
from dataclasses import replace
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from avalanche_drcpsd import CPSDGeneratorPlugin
from avalanche_drcpsd.data import make_benchmark
from avalanche_drcpsd.experiments.fidelity import confusion_accuracy, model_confusion
from avalanche_drcpsd.experiments.run import experience_accuracies
from avalanche_drcpsd.models import make_classifier
from avalanche_drcpsd.strategy import DRCPSD
from avalanche_drcpsd.synthetic_cache import to_uint8

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from generator_quality import experiment_for, load_variants, parse_sets, real_sets  # noqa: E402  (a sibling script)
from kept_set_stats import binomial_blur  # noqa: E402

VARIANTS_FILE = os.path.join(HERE, "replay_variants.json")
#: ``final_average_accuracy``: the mean over the test experiences (the reports' figure); ``final_stream_accuracy``:
#: over all test images pooled (the only accuracy of rows written before 2026-12-06, then named as the first)
#: ``per_class``: the accuracy on each class's test images after the last experience (empty in rows written before
#: 2026-12-06 21:00)
FIELDS = ["sets", "variant", "seed", "final_average_accuracy", "final_stream_accuracy", "per_experience", "replay_s",
          "wall_s", "overrides", "per_class"]


class KeptSets:
    """A :class:`~avalanche_drcpsd.plugins.dream_replay.SyntheticSource` of fixed per-class images: the first
    ``n_per_class`` saved images of each class asked for."""

    def __init__(self, images: Tensor, labels: Tensor):
        if images.dtype != torch.uint8 or images.dim() != 4 or labels.shape != (images.shape[0],):
            raise ValueError(f"images {tuple(images.shape)} {images.dtype} and labels {tuple(labels.shape)}: "
                             "expected (N, C, H, W) uint8 and (N,)")
        self.sets = {int(k): images[labels == k] for k in labels.unique().tolist()}

    def sample_replay(self, classes: Sequence[int], n_per_class: int) -> Tuple[Tensor, Tensor]:
        short = {k: len(self.sets.get(int(k), ())) for k in classes if len(self.sets.get(int(k), ())) < n_per_class}
        if short:
            raise ValueError(f"n_replay_per_class={n_per_class}, but the saved sets hold only {short} "
                             "images of these classes")
        x = torch.cat([self.sets[int(k)][:n_per_class].float() / 255 for k in classes])
        y = torch.cat([torch.full((n_per_class,), int(k), dtype=torch.long) for k in classes])
        return x, y


class InputBlur(torch.nn.Module):
    """A fixed 3x3 binomial low-pass (``kept_set_stats.binomial_blur``) in front of a classifier's own input
    normalisation: it sees training and test images alike without their finest texture."""

    def forward(self, x: Tensor) -> Tensor:
        return binomial_blur(x)


def match_kept_sets(images: Tensor, labels: Tensor, plugin: CPSDGeneratorPlugin, stream: Sequence[Any]) -> Tensor:
    """``replay_pixel_match`` (set in ``plugin``'s config) on saved sets (uint8): the plugin records each class's
    real pixel statistics from the experience of ``stream`` that holds it, as its generator phase does,
    and matches each class's set to it, as it does each set it draws."""
    for experience in stream:
        plugin.check_inputs(experience.dataset.eval(), f"experience {experience.current_experience}")
        plugin.record_pixel_statistics(*plugin.experience_pixels(experience))
    return to_uint8(plugin.match_pixels(images.float() / 255, labels)[0])


def run_one(sets: Dict[str, Any], overrides: Dict[str, Any], *, seed: int, data_root: str,
            verbose: bool = False, input_blur: bool = False, lwf: float = 0.0) -> Dict[str, Any]:
    """One continual run of the classifier side on ``sets``; returns the final and per-experience accuracies.
    ``input_blur``: the classifier sees every image through :class:`InputBlur` (a diagnostic of whether the kept
    sets' fine texture is what a classifier tells them from real images by). ``lwf`` > 0: Avalanche's
    ``LwFPlugin(alpha=lwf, temperature=2)`` joins the strategy, so the classifier phase's CE on the real images
    is regularised towards the previous experience's model on those images (dream replay itself unchanged)."""
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin, LwFPlugin

    overrides = dict(overrides)
    top = overrides.pop("_experiment", {})
    name = sets["benchmark"]
    exp = experiment_for(name, "cpu", data_root)
    exp = replace(exp, seed=seed, **top)
    cfg = exp.drcpsd.replace(**overrides, seed=seed, gap_samples_per_class=0)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    benchmark = make_benchmark(exp.benchmark, exp.data_root, seed=seed, **exp.benchmark_args)
    spec = benchmark.spec
    model = make_classifier(exp.classifier, num_classes=spec.num_classes, image_shape=spec.image_shape)
    if input_blur:
        model.normalize = torch.nn.Sequential(InputBlur(), model.normalize)
    strategy = DRCPSD(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=exp.lr, momentum=exp.momentum),
                      config=cfg, class_names=benchmark.class_names, verbose=verbose,
                      plugins=[LwFPlugin(alpha=lwf, temperature=2)] if lwf > 0 else None,
                      train_mb_size=exp.train_mb_size, train_epochs=exp.train_epochs, eval_mb_size=exp.eval_mb_size,
                      evaluator=EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=[]))
    images = sets["images"]
    if cfg.replay_pixel_match != "none":  # as the generator plugin matches each set it draws
        images = match_kept_sets(images, sets["labels"], strategy.generator_plugin, benchmark.train_stream)
    # the generator phases are skipped: dream replay draws from the saved sets
    strategy.plugins.remove(strategy.generator_plugin)
    strategy.replay_plugin.source = KeptSets(images, sets["labels"])
    t0 = time.perf_counter()
    for experience in benchmark.train_stream:
        strategy.train(experience)
    results = strategy.eval(benchmark.test_stream)
    per = experience_accuracies(results)
    counts = model_confusion(strategy.model, [e.dataset.eval() for e in benchmark.test_stream], spec.num_classes,
                             batch_size=exp.eval_mb_size)
    per_class = confusion_accuracy(list(range(spec.num_classes)), counts)
    return {"final_average_accuracy": round(float(np.mean(per)), 4),
            "final_stream_accuracy": round(results["Top1_Acc_Stream/eval_phase/test_stream/Task000"], 4),
            "per_experience": json.dumps([round(a, 4) for a in per]),
            "per_class": json.dumps([round(per_class[k], 4) for k in range(spec.num_classes)]),
            "replay_s": round(strategy.timer.total("replay"), 1),
            "wall_s": round(time.perf_counter() - t0, 1)}


def append_row(path: str, row: Dict[str, Any]) -> None:
    new = not os.path.isfile(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--sets", help="a <variant>_sets.pt of benchmarks/generator_quality.py")
    source.add_argument("--real", metavar="BENCHMARK",
                        help="replay real training images of BENCHMARK instead of synthetic sets (--real-per-class "
                             "of each class, seed --real-seed): what dream replay reaches with a perfect generator")
    parser.add_argument("--real-per-class", type=int, default=500)
    parser.add_argument("--real-seed", type=int, default=0)
    parser.add_argument("--variants", default="base", help="comma-separated names of replay_variants.json")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                        help="an extra DRCPSDConfig field for every variant (the variant is named with it)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--out", default="results/replay")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--input-blur", action="store_true",
                        help="the classifier sees every image (training and test) through a 3x3 binomial blur; "
                             "the variant is named with +input_blur")
    parser.add_argument("--lwf", type=float, default=0.0, metavar="ALPHA",
                        help="add Avalanche's LwFPlugin(alpha=ALPHA, temperature=2): the classifier phase distils "
                             "the previous model's logits on the real images; the variant is named with +lwf=ALPHA")
    args = parser.parse_args(argv)
    if not args.lwf >= 0:
        parser.error(f"--lwf {args.lwf}: expected a weight >= 0 (0: off)")
    torch.set_num_threads(args.threads)
    variants = load_variants(VARIANTS_FILE)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in variants]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; expected some of {sorted(variants)}")
    extra = parse_sets(parser, args.set, example="replay_epochs=5")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: expected comma-separated integers")
    if args.real is not None:
        if args.real_per_class < 1:
            parser.error(f"--real-per-class {args.real_per_class}: expected a number of images >= 1")
        try:
            sets = real_sets(args.real, args.real_per_class, seed=args.real_seed, data_root=args.data_root)
        except (ValueError, KeyError) as exc:
            parser.error(f"--real {args.real!r}: {exc}")
        label = f"real{args.real_per_class}_seed{args.real_seed}"
    else:
        if not os.path.isfile(args.sets):
            parser.error(f"--sets {args.sets!r} does not exist; benchmarks/generator_quality.py writes "
                         "<variant>_sets.pt")
        sets = torch.load(args.sets, map_location="cpu", weights_only=True)
        label = os.path.splitext(os.path.basename(args.sets))[0].removesuffix("_sets")
    out = os.path.join(args.out, sets["benchmark"], "ablation.csv")
    for v in names:
        overrides = {**variants[v], **extra}
        name = v + "".join(f"+{item}" for item in sorted(args.set)) + ("+input_blur" if args.input_blur else "") \
            + (f"+lwf={args.lwf:g}" if args.lwf > 0 else "")
        accs: List[float] = []
        for seed in seeds:
            row = run_one(sets, overrides, seed=seed, data_root=args.data_root, input_blur=args.input_blur,
                          lwf=args.lwf)
            row = {"sets": label, "variant": name, "seed": seed, **row,
                   "overrides": json.dumps(overrides, sort_keys=True)}
            append_row(out, row)
            accs.append(row["final_average_accuracy"])
            print(f"[{label} / {name} / seed {seed}] {row['final_average_accuracy']:.3f} {row['per_experience']} "
                  f"replay {row['replay_s']} s", flush=True)
        print(f"[{label} / {name}] mean {np.mean(accs):.3f} +- {np.std(accs):.3f} over {len(seeds)} seed(s)",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
