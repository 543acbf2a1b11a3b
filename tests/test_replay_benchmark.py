"""benchmarks/replay_quality.py: the classifier side alone on saved synthetic sets."""

import json
from typing import Optional

import pytest
import torch
from conftest import benchmark_module


def _sets(n_per_class=6, classes=range(10)):
    labels = torch.tensor(list(classes)).repeat_interleave(n_per_class)
    images = torch.arange(len(labels), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 28, 28).contiguous()
    return images, labels


def test_kept_sets_give_the_first_images_of_each_class_in_0_1():
    rq = benchmark_module("replay_quality")
    images, labels = _sets()
    x, y = rq.KeptSets(images, labels).sample_replay([3, 1], 2)
    assert y.tolist() == [3, 3, 1, 1]
    assert torch.equal(x[:, 0, 0, 0] * 255, torch.tensor([18.0, 19.0, 6.0, 7.0]))
    with pytest.raises(ValueError, match=r"n_replay_per_class=7.*\{3: 6\}"):
        rq.KeptSets(images, labels).sample_replay([3], 7)
    with pytest.raises(ValueError, match="uint8"):
        rq.KeptSets(images.float(), labels)


def _tiny_run(rq, monkeypatch=None, factory: Optional[str] = None, **options):
    """One tiny ``run_one`` of the loaded ``replay_quality`` module ``rq`` on the embedded data; returns its row and
    the objects that the module's ``factory`` (a name in it, e.g. ``make_classifier``; none if None) built during
    the run."""
    built = []
    if factory is not None:
        make = getattr(rq, factory)
        monkeypatch.setattr(rq, factory, lambda *a, **k: built.append(make(*a, **k)) or built[-1])
    images, labels = _sets(n_per_class=8)
    sets = {"images": images, "labels": labels, "benchmark": "default"}
    row = rq.run_one(sets, {"replay_epochs": 1, "n_replay_per_class": 8, "_experiment": {"train_epochs": 1}}, seed=0,
                     data_root="", **options)
    return row, built


def test_run_one_replays_the_saved_sets_without_a_generator(one_thread):
    rq = benchmark_module("replay_quality")
    row, _ = _tiny_run(rq)
    per = json.loads(row["per_experience"])
    assert len(per) == 5 and all(0.0 <= a <= 1.0 for a in per)
    assert row["replay_s"] > 0, "dream replay ran from the saved sets"
    assert row["final_average_accuracy"] == pytest.approx(sum(per) / len(per), abs=1e-4)  # the reports' figure
    per_class = json.loads(row["per_class"])  # two classes per experience, as many test images each
    assert len(per_class) == 10
    assert per == pytest.approx([(a + b) / 2 for a, b in zip(per_class[::2], per_class[1::2])], abs=1e-4)
    assert 0.0 <= row["final_stream_accuracy"] <= 1.0 and set(row) | {"sets", "variant", "seed", "overrides"} == set(
        rq.FIELDS)


def test_real_sets_are_training_images_of_every_class_in_the_sets_format():
    gq = benchmark_module("generator_quality")
    sets = gq.real_sets("default", 7, seed=3, data_root="")
    assert sets["images"].dtype == torch.uint8 and sets["images"].shape[1:] == (1, 28, 28)
    assert sets["labels"].bincount().tolist() == [7] * 10 and sets["variant"] == "real7"
    again = gq.real_sets("default", 7, seed=3, data_root="")
    assert torch.equal(sets["images"], again["images"])  # seeded
    assert not torch.equal(sets["images"], gq.real_sets("default", 7, seed=4, data_root="")["images"])
    from avalanche_drcpsd.data import make_benchmark

    stream = make_benchmark("default", "").train_stream
    train = torch.cat([torch.stack([x for x, *_ in e.dataset.eval()]) for e in stream])
    pool = {bytes((img * 255).round().to(torch.uint8).numpy()) for img in train}
    assert all(bytes(img.numpy()) in pool for img in sets["images"]), "every image is a training image"
    with pytest.raises(ValueError, match="n_per_class=100000, but default has only"):
        gq.real_sets("default", 100000, seed=0, data_root="")


def test_input_blur_puts_the_low_pass_in_front_of_the_classifier(one_thread, monkeypatch):
    rq = benchmark_module("replay_quality")
    row, built = _tiny_run(rq, monkeypatch, "make_classifier", input_blur=True)
    assert 0.0 <= row["final_average_accuracy"] <= 1.0
    front = built[0].normalize[0]
    assert isinstance(front, rq.InputBlur)
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(front(x), benchmark_module("kept_set_stats").binomial_blur(x))


def test_lwf_joins_after_dream_replay_and_keeps_the_student_as_its_previous_model(one_thread, monkeypatch):
    from avalanche.training.plugins import LwFPlugin

    rq = benchmark_module("replay_quality")
    _, built = _tiny_run(rq, monkeypatch, "DRCPSD", lwf=1.0)
    strategy = built[0]
    lwf = [p for p in strategy.plugins if isinstance(p, LwFPlugin)]
    assert len(lwf) == 1 and strategy.plugins.index(lwf[0]) > strategy.plugins.index(strategy.replay_plugin)
    # its snapshot is taken after dream replay: the model it distils from next is the replay's student
    previous = lwf[0].lwf.prev_model.state_dict()
    assert all(torch.equal(previous[k], v) for k, v in strategy.model.state_dict().items())
    with pytest.raises(SystemExit):
        rq.main(["--real", "default", "--lwf", "-1"])


def test_matched_sets_take_each_class_histogram_from_the_experience_that_holds_it():
    """``replay_pixel_match="class_histogram"`` on saved sets: each class's set is matched to its own class's
    real training images (the embedded data's), whichever experience holds the class."""
    from avalanche_drcpsd import CPSDGeneratorPlugin, DRCPSDConfig
    from avalanche_drcpsd.data import make_benchmark
    from avalanche_drcpsd.histogram import pixel_histogram
    from avalanche_drcpsd.utils import dataset_tensors

    rq = benchmark_module("replay_quality")
    benchmark = make_benchmark("default", seed=0)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat_interleave(20)
    images = (torch.rand(200, 1, 28, 28, generator=g) * 255).to(torch.uint8)  # flat grey noise, no black
    plugin = CPSDGeneratorPlugin(DRCPSDConfig(replay_pixel_match="class_histogram"), verbose=False)
    out = rq.match_kept_sets(images, labels, plugin, benchmark.train_stream)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    for experience in benchmark.train_stream:
        x, y = dataset_tensors(experience.dataset.eval())
        for k in y.unique().tolist():
            real, matched = pixel_histogram(x[y == k]), pixel_histogram(out[labels == k])
            black = real[0, 0] / real.sum()
            assert abs(matched[0, 0] / matched.sum() - black) < 0.02, f"class {k}: its real black share"
            assert abs(out[labels == k].float().mean() / 255 - x[y == k].mean()) < 0.02
