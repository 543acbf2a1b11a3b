"""DR-CPSD on Avalanche's own SplitMNIST, with its default normalised transform and with images in [0, 1].

    python benchmarks/avalanche_split_mnist.py --data-root ../shared/data --out results/avalanche_split_mnist

The setting of issue 15's report: Avalanche's ``SplitMNIST`` (5 experiences, fixed class order 0..9), the first 3
experiences with 1000 random training images each and their full test sets, Avalanche's ``SimpleMLP`` (2 hidden
layers of 400), SGD lr 0.05, 3 epochs, batch 64; DR-CPSD with the Split-MNIST CPU profile's ``drcpsd`` block,
300 generator steps per experience and 200 replay images per class. The stream is built with Avalanche's
``benchmark_from_datasets`` over the slices (no classes timeline). The same seeded run is made twice: with
``SplitMNIST``'s default transforms (``Normalize((0.1307,), (0.3081,))``: images in about [-0.42, 2.82]) and with
none (images in [0, 1]). Avalanche extracts MNIST's archives beside them, so the data are copied to a temporary
folder first.

Writes ``<out>/summary.csv`` (one row per transform: accuracy on each experience after the last, their mean,
the input space DR-CPSD learned, wall time) and ``<out>/command.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time

import torch
from avalanche.benchmarks.classic import SplitMNIST
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.models import SimpleMLP
from avalanche.training.plugins import EvaluationPlugin
from torch import nn

from avalanche_drcpsd import DRCPSD, DRCPSDConfig
from avalanche_drcpsd.data import MNIST_CLASSES
from avalanche_drcpsd.utils import atomic_write_csv, atomic_write_text

HERE = os.path.dirname(os.path.abspath(__file__))
PROFILE = os.path.join(HERE, "..", "experiments", "split_mnist_cpu.json")


def _slice(dataset, n, seed):
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    return dataset.subset(sorted(idx.tolist()))


def run(root: str, transform: str, args) -> dict:
    kwargs = {} if transform == "normalised" else {"train_transform": None, "eval_transform": None}
    benchmark = SplitMNIST(n_experiences=5, seed=0, fixed_class_order=list(range(10)), dataset_root=root, **kwargs)
    k = args.experiences
    stream = benchmark_from_datasets(
        train=[_slice(benchmark.train_stream[e].dataset, args.train_images, e) for e in range(k)],
        test=[benchmark.test_stream[e].dataset for e in range(k)])
    with open(PROFILE) as fh:
        block = json.load(fh)["drcpsd"]
    block.update(generator_steps=args.generator_steps, n_replay_per_class=args.replay_per_class, seed=args.seed,
                 gap_samples_per_class=0)
    torch.manual_seed(args.seed)
    model = SimpleMLP(num_classes=10, hidden_size=400, hidden_layers=2)
    strategy = DRCPSD(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                      criterion=nn.CrossEntropyLoss(), config=DRCPSDConfig.from_dict(block),
                      class_names=list(MNIST_CLASSES), train_mb_size=64, train_epochs=3, eval_mb_size=1000,
                      evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]), device="cpu",
                      verbose=not args.quiet)
    start = time.perf_counter()
    strategy.train(stream.train_stream)
    wall = time.perf_counter() - start
    results = strategy.eval(stream.test_stream)
    accs = [results[f"Top1_Acc_Exp/eval_phase/test_stream/Exp{e:03d}"] for e in range(k)]
    space = strategy.generator_plugin.input_space
    row = {"transform": transform, **{f"acc_exp{e}": round(a, 4) for e, a in enumerate(accs)},
           "mean_accuracy": round(sum(accs) / k, 4), "input_space": space.source,
           "input_low": round(space.low[0], 4), "input_high": round(space.high[0], 4), "wall_time_s": round(wall, 1)}
    print(row, flush=True)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--out", default="results/avalanche_split_mnist")
    parser.add_argument("--experiences", type=int, default=3)
    parser.add_argument("--train-images", type=int, default=1000)
    parser.add_argument("--generator-steps", type=int, default=300)
    parser.add_argument("--replay-per-class", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--transforms", default="normalised,pixels")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    source = os.path.join(args.data_root, "MNIST")
    if not os.path.isdir(os.path.join(source, "raw")):
        raise SystemExit(f"MNIST not found at {source!r} (expected raw/*.gz); pass --data-root")
    os.makedirs(args.out, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:  # Avalanche extracts the archives beside them
        shutil.copytree(source, os.path.join(tmp, "MNIST"))
        for transform in args.transforms.split(","):
            if transform not in ("normalised", "pixels"):
                raise SystemExit(f"--transforms: {transform!r}; expected normalised and/or pixels")
            rows.append(run(tmp, transform, args))
            atomic_write_csv(os.path.join(args.out, "summary.csv"), rows)
    atomic_write_text(os.path.join(args.out, "command.txt"),
                      "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + sys.argv[1:]) + "\n")


if __name__ == "__main__":
    main()
