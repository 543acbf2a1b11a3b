"""benchmarks/generator_quality.py: the rescoring of saved sets and the ablation table's CAS recipe column."""

import csv

import torch
from conftest import benchmark_module

from avalanche_drcpsd.synthetic_cache import to_uint8


def test_rescore_scores_each_seed_beside_as_many_real_images(tmp_path, one_thread):
    """A saved set of 50 real training images per class of the main job's data: one row per class with the CAS
    over the seeds and, beside it, the same recipe on 50 real training images per class drawn per seed; the file
    is named by the CAS schedule. Beside it the confusion of both classifiers, summed over the seeds."""
    gq = benchmark_module("generator_quality")
    benchmark = gq.make_benchmark(gq.experiment_for("default", "cpu", "").benchmark, None, seed=0)
    [(x, y)], _ = gq._streams(benchmark, iid=True)
    keep = torch.cat([torch.nonzero(y == k).flatten()[:50] for k in range(10)])
    path = tmp_path / "real_sets.pt"
    torch.save({"images": to_uint8(x[keep]), "labels": y[keep], "benchmark": "default", "variant": "real",
                "seed": 0}, path)
    rows = gq.rescore(str(path), [0, 1], data_root="", profile="cpu", cas_epochs=6)
    assert [r["class"] for r in rows] == list(range(10))
    for r in rows:
        seeds = [float(v) for v in r["cas_seeds"].split()]
        assert len(seeds) == 2 and abs(r["cas_mean"] - sum(seeds) / 2) < 1e-3
        assert 0.0 <= r["real_cas_min"] <= r["real_cas_mean"] <= 1.0
        assert r["images_per_class"] == 50 and r["cas_schedule"] == "cosine"
    assert sum(r["cas_mean"] for r in rows) / 10 > 0.3, "real images as the set score above chance"
    assert (tmp_path / "real_cas_seeds.csv").is_file()
    with open(tmp_path / "real_confusion.csv", newline="", encoding="utf-8") as fh:
        confusion = list(csv.DictReader(fh))
    assert [(r["trained_on"], int(r["class"])) for r in confusion] == \
        [(source, k) for source in ("kept sets", "real") for k in range(10)]
    for r in confusion:  # each row: where the class's real test images went, over both seeds
        assert abs(sum(float(r[f"taken_for_{j}"]) for j in range(10)) - 1) < 1e-3
        if r["trained_on"] == "kept sets":  # its diagonal is the seeds' mean CAS
            assert abs(float(r[f"taken_for_{r['class']}"]) - rows[int(r["class"])]["cas_mean"]) < 2e-3
    assert (tmp_path / "real_confusion.png").stat().st_size > 0
    gq.rescore(str(path), [0], data_root="", profile="cpu", cas_epochs=1, cas_schedule="constant")
    assert (tmp_path / "real_cas_seeds_constant.csv").is_file()


def test_ablation_rows_name_their_cas_schedule_and_old_rows_read_constant(tmp_path):
    gq = benchmark_module("generator_quality")
    path = tmp_path / "ablation.csv"
    old = {k: "1" for k in gq.ABLATION_COLUMNS if k != "cas_schedule"}
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(old))
        writer.writeheader()
        writer.writerow({**old, "benchmark": "a", "variant": "old"})
    gq.upsert_ablation(str(path), {**old, "benchmark": "a", "variant": "new", "cas_schedule": "cosine"})
    with open(path, newline="", encoding="utf-8") as fh:
        rows = {r["variant"]: r["cas_schedule"] for r in csv.DictReader(fh)}
    assert rows == {"old": "constant", "new": "cosine"}


def test_a_label_names_its_variant_its_set_items_and_its_draw():
    """--summarise rebuilds an ablation row's overrides from a CSV's label alone."""
    gq = benchmark_module("generator_quality")
    variants = {"profile": {}, "ema": {"generator_ema_decay": 0.999}}
    assert gq.label_overrides("profile+cond_dropout=0.2_first4_seed69@g1.5", variants) == {
        "cond_dropout": 0.2, "draw": "g1.5"}
    assert gq.label_overrides('ema+replay_draw="once"+guidance_interval=[0,0.6]_iid', variants) == {
        "generator_ema_decay": 0.999, "replay_draw": "once", "guidance_interval": [0, 0.6]}
    assert gq.label_overrides("ema_seed7", variants) == {"generator_ema_decay": 0.999}

