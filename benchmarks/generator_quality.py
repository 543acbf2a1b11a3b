"""The generator alone, trained continually over a benchmark's experiences: how well it keeps every class.

    python benchmarks/generator_quality.py --benchmark split_mnist --variants profile,ema,once --threads 2
    python benchmarks/generator_quality.py --benchmark split_mnist --variants profile --iid

No classifier is trained. Per experience, :class:`~avalanche_drcpsd.CPSDGeneratorPlugin` (the library's own
plugin, configured as the profile ``experiments/<benchmark>_<profile>.json``'s ``drcpsd`` block plus the
variant's fields from ``benchmarks/generator_variants.json``) runs its phases exactly as inside ``DRCPSD``:
generation of the old classes' replay set, the generator phase, the CPSD phase. Then the replay set that the
next experience would use (every class seen so far) is drawn and measured:

* **CAS** per class (Ravuri & Vinyals, 2019): a small CNN trained on those synthetic images alone, its accuracy
  on each class's real test images (:func:`avalanche_drcpsd.experiments.fidelity.classification_accuracy_score`);
* **FID/KID** against the seen classes' real test images, in the features of the benchmark's own extractor
  (trained once on its whole training set, as ``drcpsd-compare`` does);
* the wall time of each phase (generator, CPSD, generation), from the plugin's phase timer.

``--draw NAME:FIELD=JSON`` adds alternative replay sets drawn from the same generator with other sampling
settings (guidance scale, sampler steps, images per class), each class once right after it is learned, as
``replay_draw="once"`` keeps them; each is measured like the variant's own set and written as
``<variant>@NAME``. One training run then screens the sampling settings: the generator's training never reads
its kept sets (with ``generator_distill_weight=0``, the CPU profiles' setting).

``--rescore SETS --cas-seeds 0,1,2,3,4`` trains nothing: it measures the CAS of saved sets once per CAS classifier
seed, to separate a set's quality from the CAS classifier's own seed, and beside it the same recipe trained on as
many real images per class (what a perfect generator's set would score). It also writes the classifiers'
confusion on the real test images, summed over the seeds, for the sets and for the real images
(``<SETS without _sets.pt>_confusion.csv`` and ``.png``, the plot with their difference): which class each
class's real images are taken for.

The CAS classifier anneals its learning rate to 0 (``--cas-schedule cosine``, the default since 2026-12-05);
every ablation row before that was measured at a constant rate (``constant``, named in the row's
``cas_schedule`` column), whose score depends on where the last step left the weights.

``--iid`` is the bound without forgetting: one experience holding every class, with the generator steps of all
experiences together (the same budget).

Writes ``<out>/<benchmark>/<variant>.csv`` (one row per experience and class), ``<variant>_cas.png`` (CAS per
class per experience), ``<variant>_samples_exp<k>.png`` (sample grids) and upserts one row per
(benchmark, variant) into ``<out>/ablation.csv``: final mean and min CAS over all classes, FID, generator
seconds (generator + CPSD + generation phases, without the final measuring draw). A variant whose CSV exists is
not rerun (delete it to rerun).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shlex
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from avalanche_drcpsd.config import LR_SCHEDULES, DRCPSDConfig  # noqa: E402
from avalanche_drcpsd.data import make_benchmark  # noqa: E402
from avalanche_drcpsd.experiments.compare import ensure_feature_extractor, profile_config  # noqa: E402
from avalanche_drcpsd.experiments.fidelity import (  # noqa: E402
    cas_confusion,
    classification_accuracy_score,
    confusion_accuracy,
    fid_kid,
)
from avalanche_drcpsd.experiments.report import annotated_grid  # noqa: E402
from avalanche_drcpsd.experiments.run import _image_grid, default_experiment  # noqa: E402
from avalanche_drcpsd.plugins.generator import CPSDGeneratorPlugin  # noqa: E402
from avalanche_drcpsd.synthetic_cache import to_uint8  # noqa: E402
from avalanche_drcpsd.utils import atomic_write, atomic_write_csv, atomic_write_text, dataset_tensors  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS_FILE = os.path.join(HERE, "generator_variants.json")
GENERATOR_PHASES = ("generator", "cpsd", "generation")
#: the DRCPSDConfig fields a ``--draw`` alternative may change: how the kept sets are sampled, not how the
#: generator is trained
DRAW_FIELDS = ("guidance_scale", "guidance_draw", "guidance_interval", "sampling_steps", "sampler",
               "n_replay_per_class")
ABLATION_COLUMNS = ("benchmark", "variant", "iid", "experiences", "final_mean_cas", "min_cas", "min_cas_class",
                    "fid", "kid", "generator_seconds", "threads", "overrides", "cas_schedule")


def load_variants(path: str = VARIANTS_FILE) -> Dict[str, Dict[str, Any]]:
    with open(path, "r", encoding="utf-8") as fh:
        return {k: v for k, v in json.load(fh).items() if not k.startswith("_")}


def experiment_for(benchmark_name: str, profile: str, data_root: str):
    """The recipe a benchmark's sets are made and measured with: ``default`` is the main job's (embedded data, its
    DR-CPSD settings), any other name the profile ``experiments/<benchmark>_<profile>.json``."""
    if benchmark_name == "default":
        return default_experiment()
    return profile_config(benchmark_name, profile, data_root, experiments=os.path.join(HERE, "..", "experiments"))


def _streams(benchmark, iid: bool):
    """``[(images, labels)]`` per training experience (one holding all of them with ``iid``), and the test set."""
    train = [dataset_tensors(e.dataset.eval()) for e in benchmark.train_stream]
    test = [dataset_tensors(e.dataset.eval()) for e in benchmark.test_stream]
    if iid:
        train = [(torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]))]
    return train, (torch.cat([x for x, _ in test]), torch.cat([y for _, y in test]))


def real_per_class(x: Tensor, y: Tensor, classes: Sequence[int], n_per_class: int, seed: int) -> Tuple[Tensor, Tensor]:
    """``n_per_class`` images of each class of ``classes`` drawn without replacement from ``(x, y)`` (seeded)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.cat([torch.nonzero(y == k).flatten()[torch.randperm(int((y == k).sum()), generator=g)[:n_per_class]]
                     for k in classes])
    return x[idx], y[idx]


def real_sets(benchmark_name: str, n_per_class: int, *, seed: int, data_root: str,
              profile: str = "cpu") -> Dict[str, Any]:
    """``n_per_class`` *real* training images of every class in the ``<variant>_sets.pt`` format (8-bit), named
    ``real<n>``: the sets a perfect generator would keep."""
    exp = experiment_for(benchmark_name, profile, data_root)
    benchmark = make_benchmark(exp.benchmark, exp.data_root, seed=seed, **exp.benchmark_args)
    [(x, y)], _ = _streams(benchmark, iid=True)
    short = {int(k): int((y == k).sum()) for k in y.unique() if int((y == k).sum()) < n_per_class}
    if short:
        raise ValueError(f"n_per_class={n_per_class}, but {benchmark_name} has only {short} training images of "
                         "these classes")
    x, y = real_per_class(x, y, sorted(int(k) for k in y.unique()), n_per_class, seed)
    return {"images": to_uint8(x), "labels": y, "benchmark": benchmark_name, "seed": seed,
            "variant": f"real{n_per_class}"}


def run_variant(benchmark_name: str, variant: str, overrides: Dict[str, Any], *, profile: str, data_root: str,
                out: str, iid: bool, threads: int, cas_epochs: int, seed: int, verbose: bool = True,
                experiences: int = 0, draws: Optional[Dict[str, Dict[str, Any]]] = None,
                cas_schedule: str = "cosine") -> List[Dict[str, Any]]:
    """Train the generator over the experiences and measure the replay set after each; with ``draws``
    (alternative name -> sampling fields of ``DRCPSDConfig``) also a kept set per alternative, each class drawn
    once right after it is learned with those fields. One ablation row per set."""
    draws = draws or {}
    exp = experiment_for(benchmark_name, profile, data_root)
    config = exp.drcpsd.replace(**overrides, seed=seed)
    benchmark = make_benchmark(exp.benchmark, exp.data_root, seed=seed, **exp.benchmark_args)
    train, (x_test, y_test) = _streams(benchmark, iid)
    train = train[:experiences] if experiences else train
    if iid:
        config = config.replace(generator_steps=config.generator_steps * len(benchmark.train_stream))
    extractor = ensure_feature_extractor(exp, os.path.join(out, benchmark_name, "feature_extractor"))
    plugin = CPSDGeneratorPlugin(config, class_names=benchmark.class_names, verbose=verbose)
    name = variant + ("_iid" if iid else "")
    folder = os.path.join(out, benchmark_name)
    os.makedirs(folder, exist_ok=True)
    rows: List[Dict[str, Any]] = []
    seen: List[int] = []
    # --draw alternatives: each class drawn once right after it is learned, with the alternative's sampling
    # settings, from the same generator (the generator's training never reads these sets)
    alt_kept: Dict[str, Dict[int, torch.Tensor]] = {a: {} for a in draws}
    alt_rows: Dict[str, List[Dict[str, Any]]] = {a: [] for a in draws}
    for e, (x, y) in enumerate(train):
        if e > 0:
            plugin.begin_experience(e)  # the replay set was drawn while measuring (below): this keeps it
        t0 = time.perf_counter()
        plugin.learn_classes(x, y)
        seen = sorted(set(seen) | set(int(c) for c in y.unique().tolist()))
        plugin.begin_experience(e + 1)  # the next experience's generation phase: the replay set of every seen class
        xs, ys = plugin.replay_set
        learn_s = time.perf_counter() - t0
        phase = {p: plugin.timer.seconds.get((e, p), 0.0) for p in ("generator", "cpsd")}
        phase["generation"] = plugin.timer.seconds.get((e + 1, "generation"), 0.0)
        _measure(rows, name, e, seen, xs, ys, x_test, y_test, extractor, phase, learn_s, folder,
                 benchmark_name=benchmark_name, cas_epochs=cas_epochs, seed=seed, cas_schedule=cas_schedule)
        base_config = plugin.config
        for alt, fields in draws.items():
            new = [k for k in seen if k not in alt_kept[alt]]
            plugin.config = base_config.replace(**fields)
            t1 = time.perf_counter()
            xa, ya = plugin.match_pixels(*plugin.sample(new, plugin.config.n_replay_per_class, desc=f"{alt} draw"))
            draw_s = time.perf_counter() - t1
            plugin.config = base_config
            for k in new:
                alt_kept[alt][k] = to_uint8(xa[ya == k])
            xa, ya = _kept_pixels(alt_kept[alt], seen)
            _measure(alt_rows[alt], f"{name}@{alt}", e, seen, xa, ya, x_test, y_test, extractor,
                     {**phase, "generation": draw_s}, learn_s, folder,
                     benchmark_name=benchmark_name, cas_epochs=cas_epochs, seed=seed, cas_schedule=cas_schedule)
    summaries = [_finish(folder, name, rows, xs, ys, benchmark_name, seed, config, iid=iid, threads=threads,
                         overrides=overrides)]
    for alt, fields in draws.items():
        summaries.append(_finish(folder, f"{name}@{alt}", alt_rows[alt], *_kept_pixels(alt_kept[alt], seen),
                                 benchmark_name, seed, config.replace(**fields), iid=iid, threads=threads,
                                 overrides={**overrides, **fields}))
    return summaries


def _kept_pixels(kept: Dict[int, torch.Tensor], seen: List[int]):
    """The kept 8-bit sets of ``seen`` as ``(pixels in [0, 1], labels)``."""
    return (torch.cat([kept[k].float() / 255 for k in seen]),
            torch.cat([torch.full((len(kept[k]),), k, dtype=torch.long) for k in seen]))


def _measure(rows, name, e, seen, xs, ys, x_test, y_test, extractor, phase, learn_s, folder, *, benchmark_name,
             cas_epochs, seed, cas_schedule) -> None:
    """CAS per class and FID/KID of the replay set ``xs, ys`` after experience ``e``: appends one row per seen
    class to ``rows``, rewrites ``<name>.partial.csv`` and draws the sample grid."""
    cas = classification_accuracy_score(xs, ys, x_test, y_test, epochs=cas_epochs, seed=seed,
                                        schedule=cas_schedule)
    real = x_test[torch.isin(y_test, torch.tensor(seen))]
    fk = fid_kid(real, xs, extractor)
    for k in seen:
        rows.append({"benchmark": benchmark_name, "variant": name, "experience": e, "class": k,
                     "cas": round(cas[k], 4), "fid": round(fk["fid"], 3), "kid": round(fk["kid_mean"], 5),
                     **{f"{p}_s": round(v, 1) for p, v in phase.items()}, "wall_s": round(learn_s, 1),
                     "cas_schedule": cas_schedule})
    atomic_write_csv(os.path.join(folder, f"{name}.partial.csv"), rows)
    grid = _image_grid(xs, ys, per_class=8)
    atomic_write(os.path.join(folder, f"{name}_samples_exp{e}.png"), lambda tmp: grid.save(tmp, format="PNG"))
    mean = sum(cas.values()) / len(cas)
    print(f"[{name}] exp {e}: mean CAS {mean:.3f}, min {min(cas.values()):.3f}, FID {fk['fid']:.1f}, "
          + ", ".join(f"{p} {v:.0f}s" for p, v in phase.items()), flush=True)


def _finish(folder, name, rows, xs, ys, benchmark_name, seed, config, *, iid, threads, overrides) -> Dict[str, Any]:
    """The last replay set (8-bit, as the synthetic cache keeps it: the input of benchmarks/replay_quality.py),
    the finished CSV, the heat map; returns the ablation row."""
    sets = {"images": to_uint8(xs), "labels": ys,
            "benchmark": benchmark_name, "variant": name, "seed": seed, "config": config.to_dict()}
    atomic_write(os.path.join(folder, f"{name}_sets.pt"), lambda tmp: torch.save(sets, tmp))
    atomic_write_csv(os.path.join(folder, f"{name}.csv"), rows)
    os.remove(os.path.join(folder, f"{name}.partial.csv"))
    _heat_map(rows, os.path.join(folder, f"{name}_cas.png"), title=f"{benchmark_name} / {name}: CAS per class")
    return summarise(rows, iid=iid, threads=threads, overrides=overrides)


def summarise(rows: List[Dict[str, Any]], *, iid: bool, threads: int, overrides: Dict[str, Any],
              upto: int = 0) -> Dict[str, Any]:
    """The ablation row of a variant's per-class rows, after its last experience (or after ``upto``
    experiences): mean and min CAS over the classes seen, FID/KID, and the generator-side seconds (generator, CPSD
    and generation phases; the measuring draw after the last experience counted is left out)."""
    rows = [{**r, "experience": int(r["experience"]), "class": int(r["class"]),
             **{k: float(r[k]) for k in ("cas", "fid", "kid", "generator_s", "cpsd_s", "generation_s")}}
            for r in rows]
    last_exp = (upto - 1) if upto else max(r["experience"] for r in rows)
    rows = [r for r in rows if r["experience"] <= last_exp]
    last = [r for r in rows if r["experience"] == last_exp]
    first_class = min(r["class"] for r in rows)
    seconds = sum(r["generator_s"] + r["cpsd_s"] + r["generation_s"] for r in rows if r["class"] == first_class)
    seconds -= last[0]["generation_s"]
    worst = min(last, key=lambda r: r["cas"])
    return {"benchmark": rows[0]["benchmark"], "variant": rows[0]["variant"], "iid": iid,
            "experiences": last_exp + 1, "final_mean_cas": round(sum(r["cas"] for r in last) / len(last), 4),
            "min_cas": worst["cas"], "min_cas_class": worst["class"], "fid": last[0]["fid"], "kid": last[0]["kid"],
            "generator_seconds": round(seconds, 1), "threads": threads,
            "overrides": json.dumps(overrides, sort_keys=True),
            # rows written before the CAS classifier had a schedule were all measured at a constant rate
            "cas_schedule": last[0].get("cas_schedule") or "constant"}


def _heat_map(rows: List[Dict[str, Any]], path: str, *, title: str) -> None:
    exps = sorted({r["experience"] for r in rows})
    classes = sorted({r["class"] for r in rows})
    grid = np.full((len(classes), len(exps)), np.nan)
    for r in rows:
        grid[classes.index(r["class"]), exps.index(r["experience"])] = r["cas"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(exps), 1.0 + 0.32 * len(classes)))
    im = annotated_grid(ax, grid, fontsize=7, aspect="auto")
    ax.set_xticks(range(len(exps)), [str(e) for e in exps])
    ax.set_yticks(range(len(classes)), [str(c) for c in classes])
    ax.set_xlabel("after experience")
    ax.set_ylabel("class")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def _confusion_plot(confusion: Dict[str, Tensor], classes: List[int], path: str, *, title: str) -> None:
    """Row-normalised confusion of the classifier trained on the kept sets, of the one trained on real images,
    and their difference (kept minus real: where the kept sets send a class's real images more often)."""
    shares = {k: (v / v.sum(1, keepdim=True)).numpy() for k, v in confusion.items()}
    panels = [("trained on the kept sets", shares["kept sets"], "viridis", 0, 1),
              ("trained on as many real images", shares["real"], "viridis", 0, 1),
              ("kept minus real", shares["kept sets"] - shares["real"], "RdBu_r", -0.3, 0.3)]
    n = len(classes)
    fig, axes = plt.subplots(1, 3, figsize=(3 * (1.4 + 0.38 * n), 1.4 + 0.38 * n))
    for ax, (name, grid, cmap, lo, hi) in zip(axes, panels):
        im = annotated_grid(ax, grid, vmin=lo, vmax=hi, cmap=cmap, fmt=lambda v: f"{100 * v:.0f}",
                            hide_below=0.005)
        ax.set_xticks(range(n), [str(c) for c in classes])
        ax.set_yticks(range(n), [str(c) for c in classes])
        ax.set_xlabel("taken for")
        ax.set_ylabel("real class")
        ax.set_title(name, fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def upsert_ablation(path: str, row: Dict[str, Any]) -> None:
    rows = []
    if os.path.isfile(path):
        with open(path, newline="", encoding="utf-8") as fh:
            rows = [r for r in csv.DictReader(fh) if (r["benchmark"], r["variant"], str(r["experiences"]))
                    != (row["benchmark"], row["variant"], str(row["experiences"]))]
    rows.append({k: row[k] for k in ABLATION_COLUMNS})
    for r in rows:  # rows from before the column existed were measured at a constant rate
        r["cas_schedule"] = r.get("cas_schedule") or "constant"
    rows.sort(key=lambda r: (r["benchmark"], int(r["experiences"]), r["variant"]))
    atomic_write_csv(path, rows)


def parse_sets(parser: argparse.ArgumentParser, items: List[str], *, example: str) -> Dict[str, Any]:
    """``--set FIELD=JSON`` options as a dict (a parser error names the bad item)."""
    extra: Dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            extra[key] = json.loads(value)
        except json.JSONDecodeError:
            parser.error(f"--set {item!r}: expected FIELD=JSON, e.g. {example}")
    return extra


def parse_draws(parser: argparse.ArgumentParser, items: List[str]) -> Dict[str, Dict[str, Any]]:
    """``--draw NAME:FIELD=JSON[;FIELD=JSON]`` options as ``{name: fields}``, each field one of
    :data:`DRAW_FIELDS` with a value ``DRCPSDConfig`` accepts (a parser error names the bad item)."""
    draws: Dict[str, Dict[str, Any]] = {}
    for item in items:
        name, _, spec = item.partition(":")
        if not name or not spec or not name.replace("_", "").replace(".", "").isalnum() or name in draws:
            parser.error(f"--draw {item!r}: expected a new NAME (letters, digits, '_', '.') then ':FIELD=JSON', "
                         "e.g. g5:guidance_scale=5")
        fields = parse_sets(parser, spec.split(";"), example="g5:guidance_scale=5")
        bad = sorted(set(fields) - set(DRAW_FIELDS))
        if bad:
            parser.error(f"--draw {item!r}: {bad} is not a sampling setting; expected some of {list(DRAW_FIELDS)}")
        try:
            DRCPSDConfig().replace(**fields)
        except ValueError as exc:
            parser.error(f"--draw {item!r}: {exc}")
        draws[name] = fields
    return draws


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmark", default="split_mnist",
                        help="a split benchmark with a profile, or 'default' "
                             "(the main job's embedded data and settings)")
    parser.add_argument("--variants", default="profile", help="comma-separated names of generator_variants.json")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                        help="an extra DRCPSDConfig field for every variant (the variant is named with it)")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--out", default="results/generator")
    parser.add_argument("--iid", action="store_true", help="one experience with every class, the same total steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cas-epochs", type=int, default=3)
    parser.add_argument("--cas-schedule", choices=LR_SCHEDULES, default="cosine",
                        help="the CAS classifier's learning rate over its epochs (constant: the recipe of every "
                             "ablation row before 2026-12-05, named in its cas_schedule column)")
    parser.add_argument("--experiences", type=int, default=0,
                        help="only the first N experiences (a screen of one learning phase; 0: all)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--draw", action="append", default=[], metavar="NAME:FIELD=JSON[;FIELD=JSON]",
                        help="an alternative replay set drawn from the same generator with other sampling settings "
                             f"({', '.join(DRAW_FIELDS)}), each class once right after it is learned; measured "
                             "like the variant's own and written as <variant>@NAME (repeatable)")
    parser.add_argument("--summarise", type=int, metavar="K", default=None,
                        help="train nothing: upsert the ablation rows of every variant CSV of --benchmark (finished or "
                             "partial) after K experiences (0: after each one's last)")
    parser.add_argument("--rescore", metavar="SETS", default=None,
                        help="train nothing: the CAS of a saved <variant>_sets.pt (its benchmark's real test set) "
                             "with each seed of --cas-seeds, per class: mean, std, min, max over the seeds; writes "
                             "<SETS without _sets.pt>_cas_seeds.csv")
    parser.add_argument("--cas-seeds", default="0,1,2,3,4", help="with --rescore: the CAS classifier's seeds")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (one line per experience)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = load_variants()
    extra = parse_sets(parser, args.set, example="generator_steps=300")
    draws = parse_draws(parser, args.draw)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in variants]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; expected some of {sorted(variants)}")
    if args.summarise is not None:
        _summarise_folder(args, variants)
        return 0
    if args.rescore is not None:
        rescore(args.rescore, [int(v) for v in args.cas_seeds.split(",") if v.strip()], data_root=args.data_root,
                profile=args.profile, cas_epochs=args.cas_epochs, cas_schedule=args.cas_schedule)
        return 0
    os.makedirs(args.out, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    log = os.path.join(args.out, "command.txt")
    lines = open(log).read().splitlines() if os.path.isfile(log) else []
    if command not in lines:
        atomic_write_text(log, "\n".join(lines + [command]) + "\n")
    for v in names:
        overrides = {**variants[v], **extra}
        label = (v + "".join(f"+{item}" for item in sorted(args.set))
                 + (f"_first{args.experiences}" if args.experiences else "")
                 + (f"_seed{args.seed}" if args.seed != 42 else ""))
        target = os.path.join(args.out, args.benchmark, label + ("_iid" if args.iid else "") + ".csv")
        if os.path.isfile(target):
            print(f"[{label}] done already ({target}); delete it to rerun")
            continue
        for row in run_variant(args.benchmark, label, overrides, profile=args.profile, data_root=args.data_root,
                               out=args.out, iid=args.iid, threads=args.threads, cas_epochs=args.cas_epochs,
                               seed=args.seed, verbose=not args.quiet, experiences=args.experiences, draws=draws,
                               cas_schedule=args.cas_schedule):
            upsert_ablation(os.path.join(args.out, "ablation.csv"), row)
            print(f"[{row['variant']}] final mean CAS {row['final_mean_cas']}, min {row['min_cas']} (class "
                  f"{row['min_cas_class']}), FID {row['fid']}, generator {row['generator_seconds']} s", flush=True)
    return 0


def rescore(path: str, seeds: List[int], *, data_root: str, profile: str, cas_epochs: int,
            cas_schedule: str = "cosine") -> List[Dict[str, Any]]:
    """CAS per class of the sets saved at ``path`` with each CAS classifier seed: how much of a class's CAS is the
    CAS classifier's own seed. Beside it, per class, the same recipe trained on as many *real* training images of
    each class as the set holds (drawn per seed): the score a perfect generator would get (``real_cas_*``).
    Writes ``<path without _sets.pt>_cas_seeds[_constant].csv`` (one row per class) and returns its rows."""
    sets = torch.load(path, weights_only=False)
    name = sets["benchmark"]
    exp = experiment_for(name, profile, data_root)
    benchmark = make_benchmark(exp.benchmark, exp.data_root, seed=sets["seed"], **exp.benchmark_args)
    [(x_train, y_train)], (x_test, y_test) = _streams(benchmark, iid=True)
    x, y = sets["images"].float() / 255, sets["labels"]
    classes = sorted(int(k) for k in y.unique())
    per_class = min(int((y == k).sum()) for k in classes)

    confusion = {"kept sets": 0, "real": 0}

    def score(images, labels, s, source):
        ks, counts = cas_confusion(images, labels, x_test, y_test, epochs=cas_epochs, seed=s, schedule=cas_schedule)
        confusion[source] = confusion[source] + counts
        return confusion_accuracy(ks, counts)

    per_seed = [score(x, y, s, "kept sets") for s in seeds]
    real_seed = [score(*real_per_class(x_train, y_train, classes, per_class, s), s, "real") for s in seeds]
    rows = []
    for k in classes:
        v = np.array([c[k] for c in per_seed])
        r = np.array([c[k] for c in real_seed])
        rows.append({"benchmark": name, "variant": sets["variant"], "class": k, "cas_mean": round(float(v.mean()), 4),
                     "cas_std": round(float(v.std(ddof=1)) if len(v) > 1 else 0.0, 4),
                     "cas_min": round(float(v.min()), 4), "cas_max": round(float(v.max()), 4),
                     "cas_seeds": " ".join(f"{c:.3f}" for c in v), "real_cas_mean": round(float(r.mean()), 4),
                     "real_cas_min": round(float(r.min()), 4), "images_per_class": per_class,
                     "cas_schedule": cas_schedule})
    suffix = "" if cas_schedule == "cosine" else f"_{cas_schedule}"
    atomic_write_csv(path.removesuffix("_sets.pt") + f"_cas_seeds{suffix}.csv", rows)
    atomic_write_csv(path.removesuffix("_sets.pt") + f"_confusion{suffix}.csv", [
        {"benchmark": name, "variant": sets["variant"], "trained_on": source, "class": k, "cas_seeds": len(seeds),
         **{f"taken_for_{j}": round(float(counts[i, c] / counts[i].sum()), 4) for c, j in enumerate(classes)}}
        for source, counts in confusion.items() for i, k in enumerate(classes)])
    _confusion_plot(confusion, classes, path.removesuffix("_sets.pt") + f"_confusion{suffix}.png",
                    title=f"{name} / {sets['variant']}: CAS classifiers' confusion on the real test images, "
                          f"% ({len(seeds)} seed(s), {per_class} images per class)")
    means = [r["cas_mean"] for r in rows]
    print(f"[{sets['variant']}] CAS ({cas_schedule}) over {len(seeds)} seeds: mean {np.mean(means):.3f}, min class "
          f"mean {min(means):.3f} (real images, {per_class} per class: mean "
          f"{np.mean([r['real_cas_mean'] for r in rows]):.3f}); per class "
          + " ".join(f"{r['class']}:{r['cas_mean']:.3f}+-{r['cas_std']:.3f}/{r['real_cas_mean']:.3f}" for r in rows),
          flush=True)
    return rows


#: what a label appends to ``<variant>+<--set items>``: ``--experiences``, ``--seed`` (other than 42), ``--iid``
LABEL_SUFFIX = re.compile(r"(_first\d+)?(_seed\d+)?(_iid)?$")


def label_overrides(label: str, variants: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """The ``DRCPSDConfig`` overrides a CSV's label names: its variant's fields, then its ``--set`` items (a
    ``--draw`` alternative after ``@`` is named only, as ``{"draw": name}``: its fields are not in the label)."""
    base, _, draw = label.partition("@")
    name, *items = LABEL_SUFFIX.sub("", base).split("+")
    overrides = dict(variants.get(name, {}))
    for item in items:
        field, _, value = item.partition("=")
        try:
            overrides[field] = json.loads(value)
        except json.JSONDecodeError:
            overrides[field] = value
    return {**overrides, **({"draw": draw} if draw else {})}


def _summarise_folder(args, variants: Dict[str, Dict[str, Any]]) -> None:
    """``--summarise K``: ablation rows from the CSVs already written (a killed run's ``.partial.csv`` too)."""
    folder = os.path.join(args.out, args.benchmark)
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".csv"):
            continue
        with open(os.path.join(folder, name), newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        if not rows:
            continue
        done = max(int(r["experience"]) for r in rows) + 1
        if args.summarise > done:
            print(f"{name}: {done} experience(s), fewer than {args.summarise}: skipped")
            continue
        variant = rows[0]["variant"]
        row = summarise(rows, iid=variant.endswith("_iid"), threads=args.threads,
                        overrides=label_overrides(variant, variants),
                        upto=args.summarise)
        upsert_ablation(os.path.join(args.out, "ablation.csv"), row)
        if name.endswith(".partial.csv"):
            rows_done = [r for r in rows if int(r["experience"]) < row["experiences"]]
            _heat_map([{**r, "experience": int(r["experience"]), "class": int(r["class"]), "cas": float(r["cas"])}
                       for r in rows_done], os.path.join(folder, f"{variant}_cas.png"),
                      title=f"{args.benchmark} / {variant}: CAS per class (first {row['experiences']} experiences)")
        print(f"{variant}: after {row['experiences']} experience(s) mean CAS {row['final_mean_cas']}, "
              f"min {row['min_cas']}, FID {row['fid']}")


if __name__ == "__main__":
    sys.exit(main())
