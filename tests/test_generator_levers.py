"""The generator phase's levers (issue 13): what each one does, checked on tiny models and fixed batches."""

import copy
import math

import pytest
import torch
from conftest import sgd_step_rates, tiny_config

from avalanche_drcpsd import CPSDGeneratorPlugin, DRCPSDConfig, MMDPlugin
from avalanche_drcpsd.config import ConfigError
from avalanche_drcpsd.experiments.fidelity import classification_accuracy_score
from avalanche_drcpsd.utils import dataset_tensors


def _exp_tensors(mnist_small, k):
    return dataset_tensors(mnist_small.train_stream[k].dataset.eval())


def _plugin(**overrides):
    return CPSDGeneratorPlugin(tiny_config(**overrides), verbose=False)


def _batch_sizes(plugin, monkeypatch):
    """The batch size of every later call of the plugin's generator (the teacher is a copy: not counted)."""
    sizes = []
    original = plugin.generator.predict_noise

    def spy(z, t, cond):
        sizes.append(z.shape[0])
        return original(z, t, cond)

    monkeypatch.setattr(plugin.generator, "predict_noise", spy)
    return sizes


def _flat(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


@pytest.mark.parametrize("field, value", [
    ("generator_replay_weighting", "uniform"), ("generator_distill_source", "cache"), ("replay_draw", "sometimes"),
    ("generator_lr_schedule", "linear"), ("generator_ema_decay", 1.0), ("generator_ema_decay", -0.1),
    ("generator_grad_clip", 0.0), ("generator_teacher_steps", 0), ("generator_warmup_steps", -1),
    ("replay_classes", "all"), ("generator_first_steps", 1.5), ("generator_memory_format", "nhwc"),
    ("generator_replay_loss", "mse"), ("generator_noise_offset", -0.1),
])
def test_bad_lever_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        DRCPSDConfig(**{field: value})


@pytest.mark.parametrize("weighting, n_new, n_old, expected", [
    ("fraction", 2, 8, (8, 8, 0.5, 0.5)),          # generator_replay_fraction 0.5 of a 16 batch
    ("balanced", 2, 8, (3, 13, 3 / 16, 13 / 16)),  # 8/10 of the batch: every seen class ~1/10
    ("balanced", 2, 2, (8, 8, 0.5, 0.5)),
    ("fraction", 2, 0, (16, 0, 1.0, 0.0)),          # no old class: the whole batch is real
])
def test_replay_split_gives_each_class_its_share(weighting, n_new, n_old, expected):
    plugin = _plugin(generator_replay_weighting=weighting)
    assert plugin.replay_split(n_new, n_old) == pytest.approx(expected)


def test_task_weighting_doubles_the_batch_and_weighs_by_experience():
    plugin = _plugin(generator_replay_weighting="task", generator_distill_weight=2.0)
    plugin._exp = 3
    assert plugin.replay_split(2, 6) == pytest.approx((16, 16, 0.25, 0.75 * 2.0))


def test_balanced_batches_hold_each_class_share(mnist_small, monkeypatch, one_thread):
    """With 2 new and 2 old classes the balanced split puts half of every generator batch on replay."""
    plugin = _plugin(generator_replay_weighting="balanced", generator_steps=2)
    plugin.learn_classes(*_exp_tensors(mnist_small, 0))
    plugin.begin_experience(1)
    sizes = _batch_sizes(plugin, monkeypatch)
    plugin.learn_classes(*_exp_tensors(mnist_small, 1))
    # per step: the student on 8 real, the teacher (a copy, not spied) and the student on 8 replay images
    assert sizes[:4] == [8, 8, 8, 8]


def test_zero_distillation_weight_builds_no_teacher_and_trains_on_whole_real_batches(mnist_small, monkeypatch,
                                                                                      one_thread):
    """generator_distill_weight=0 is no distillation: no frozen copy, and every step's batch is all real images."""
    import avalanche_drcpsd.plugins.generator as gp_module

    plugin = _plugin(generator_distill_weight=0.0, generator_steps=3)
    plugin.learn_classes(*_exp_tensors(mnist_small, 0))
    plugin.begin_experience(1)
    assert plugin.replay_set is not None  # an old class's replay set exists, so only the weight can skip it

    def no_teacher(module):
        raise AssertionError("a teacher was built for a zero distillation weight")

    monkeypatch.setattr(gp_module, "frozen_copy", no_teacher)
    sizes = _batch_sizes(plugin, monkeypatch)
    x, y = _exp_tensors(mnist_small, 1)
    cond_new = {int(k): plugin.text_encoder.encode([plugin.prompt(int(k))])[0] for k in y.unique()}
    plugin.train_generator(x, y, cond_new)
    assert sizes == [plugin.config.generator_batch_size] * 3


@pytest.mark.parametrize("order", ["after_generator", "before_generator"])
def test_first_steps_apply_to_the_generator_from_scratch_only(mnist_small, monkeypatch, one_thread, order):
    """The first generator phase runs generator_first_steps optimiser steps, the later ones generator_steps,
    whichever order the CPSD phase runs in (it fills the buffer before the generator phase in one of them)."""
    import avalanche_drcpsd.generator_training as training

    plugin = _plugin(generator_first_steps=5, generator_steps=2, cpsd_order=order)
    losses = []
    original = training.ldm_loss

    def spy(*args, **kwargs):  # one LDM loss per generator step (the CPSD phase has its own import)
        losses.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "ldm_loss", spy)
    counts = []
    for k in (0, 1):
        losses.clear()
        plugin.learn_classes(*_exp_tensors(mnist_small, k))
        counts.append(len(losses))
    assert counts == [5, 2]


def test_first_steps_must_be_a_count():
    with pytest.raises(ConfigError, match="generator_first_steps"):
        DRCPSDConfig(generator_first_steps=-3)


def test_fresh_distillation_matches_a_fixed_teacher(mnist_small, one_thread, monkeypatch):
    """The student starts away from the teacher; fresh-sample distillation closes most of the gap."""
    import avalanche_drcpsd.plugins.generator as gp_module

    plugin = _plugin(generator_distill_source="fresh", generator_replay_weighting="task", generator_steps=40,
                     generator_lr=2e-3, cond_dropout=0.0)
    plugin.learn_classes(*_exp_tensors(mnist_small, 0))
    teacher = copy.deepcopy(plugin.generator)
    monkeypatch.setattr(gp_module, "frozen_copy", lambda module: teacher)  # the teacher: the unperturbed generator
    gen = plugin.generator
    torch.manual_seed(1)
    with torch.no_grad():
        for p in gen.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cond = plugin.buffer.stack([0, 1]).repeat(8, 1, 1)
    z0 = teacher.sample_latents(cond, plugin.buffer.null, guidance_scale=1.0, num_inference_steps=2, sampler="ddim",
                                generator=torch.Generator().manual_seed(0))
    z_t, _, t = gen.noisy(z0, torch.Generator().manual_seed(1))

    def gap():
        with torch.no_grad():
            return float((gen.predict_noise(z_t, t, cond) - teacher.predict_noise(z_t, t, cond)).pow(2).mean())

    before = gap()
    plugin._exp = 10_000  # 1/(t+1) ~ 0: the new classes' term vanishes, the step is distillation
    plugin.train_generator(*_exp_tensors(mnist_small, 0), {0: plugin.buffer.embeddings[0]})
    assert gap() < 0.5 * before


def test_ldm_replay_builds_no_teacher_and_denoises_the_kept_sets(mnist_small, monkeypatch, one_thread):
    """generator_replay_loss="ldm" on kept sets: no frozen copy, every step a real and a kept batch, and the old
    classes' kept images denoised better than after the same steps on the new classes alone."""
    import dataclasses

    import avalanche_drcpsd.plugins.generator as gp_module

    plugin = _plugin(replay_draw="once", generator_replay_loss="ldm", generator_replay_weighting="task",
                     generator_steps=30, generator_lr=2e-3, cond_dropout=0.0)
    plugin.learn_classes(*_exp_tensors(mnist_small, 0))
    plugin.begin_experience(1)
    x_old, y_old = plugin.replay_set
    without = copy.deepcopy(plugin)
    without.config = dataclasses.replace(plugin.config, generator_distill_weight=0.0)

    def no_teacher(module):
        raise AssertionError("a teacher was built for LDM replay on a kept set")

    monkeypatch.setattr(gp_module, "frozen_copy", no_teacher)
    sizes = _batch_sizes(plugin, monkeypatch)
    x, y = _exp_tensors(mnist_small, 1)
    cond_new = {int(k): plugin.text_encoder.encode([plugin.prompt(int(k))])[0] for k in y.unique()}
    plugin._exp = without._exp = 10_000  # 1/(t+1) ~ 0: the replay term carries the step
    plugin.train_generator(x, y, cond_new)
    without.train_generator(x, y, cond_new)
    assert sizes[:2] == [16, 16]  # the real batch, then as many kept images

    z0 = plugin.generator.encode(x_old)
    cond = plugin.buffer.stack(y_old.tolist())

    def denoising_loss(model):
        losses = []
        for seed in range(4):
            z_t, noise, t = model.noisy(z0, torch.Generator().manual_seed(seed))
            with torch.no_grad():
                losses.append(float((model.predict_noise(z_t, t, cond) - noise).pow(2).mean()))
        return sum(losses) / len(losses)

    assert denoising_loss(plugin.generator) < denoising_loss(without.generator)


def test_replay_source_refuses_a_missing_teacher_and_an_unknown_loss():
    from avalanche_drcpsd.generator_training import DistillationSource

    kept = dict(classes=[0], embeddings=torch.zeros(1, 2, 4), images=torch.zeros(2, 1, 8, 8),
                labels=torch.zeros(2, dtype=torch.long))
    assert DistillationSource(teacher=None, loss="ldm", **kept).teacher is None  # a kept pool needs no teacher
    with pytest.raises(ValueError, match="needs a teacher"):
        DistillationSource(teacher=None, loss="distill", **kept)
    with pytest.raises(ValueError, match="needs a teacher"):  # fresh inputs are the teacher's samples
        DistillationSource(teacher=None, classes=[0], embeddings=torch.zeros(1, 2, 4), loss="ldm")
    with pytest.raises(ValueError, match="loss='mse'"):
        DistillationSource(teacher=None, loss="mse", **kept)


def test_ema_weights_are_the_ones_sampled_and_saved(mnist_small, monkeypatch, one_thread, tmp_path):
    """With an EMA the generator ends the phase on the averaged weights, not the last optimiser step's."""
    from diffusers.training_utils import EMAModel

    seen = {}
    original_copy_to = EMAModel.copy_to

    def spy(self, parameters):
        seen["shadow"] = torch.cat([p.detach().flatten().clone() for p in self.shadow_params])
        params = list(parameters)
        seen["live"] = torch.cat([p.detach().flatten().clone() for p in params])
        return original_copy_to(self, params)

    monkeypatch.setattr(EMAModel, "copy_to", spy)
    plugin = _plugin(generator_ema_decay=0.9, generator_steps=6)
    plugin.learn_classes(*_exp_tensors(mnist_small, 0))
    final = _flat(plugin.generator.unet)
    assert not torch.equal(seen["shadow"], seen["live"])
    assert torch.equal(final, seen["shadow"])
    plugin.generator.save_pretrained(tmp_path / "g")
    from avalanche_drcpsd.generator import DiffusionGenerator

    assert torch.equal(_flat(DiffusionGenerator.from_pretrained(tmp_path / "g").unet), seen["shadow"])


def test_lr_schedule_and_clipping_change_the_training(mnist_small, one_thread):
    x, y = _exp_tensors(mnist_small, 0)
    results = {}
    for name, extra in {"plain": {}, "cosine": {"generator_lr_schedule": "cosine", "generator_warmup_steps": 2},
                        "clip": {"generator_grad_clip": 1e-3}}.items():
        plugin = _plugin(generator_steps=4, seed=3, **extra)
        plugin.learn_classes(x, y)
        results[name] = _flat(plugin.generator.unet)
    assert not torch.equal(results["plain"], results["cosine"])
    assert not torch.equal(results["plain"], results["clip"])


def test_offset_noise_is_constant_over_each_image_in_pixel_space_and_changes_the_training(mnist_small, one_thread):
    from avalanche_drcpsd.generator import DiffusionGenerator

    gen = DiffusionGenerator.build(image_shape=(1, 28, 28), cross_attention_dim=8, block_out_channels=(8, 16),
                                   attention_head_dim=1, patch_size=2)
    z0 = gen.encode(torch.rand(3, 1, 28, 28))
    offset = gen.constant_noise(z0.shape, torch.Generator().manual_seed(0))
    assert offset.shape == z0.shape
    pixels = torch.nn.functional.pixel_shuffle(offset, 2)  # back to the padded image
    assert torch.allclose(pixels, pixels[:, :, :1, :1].expand_as(pixels))  # one value per image ...
    assert pixels[:, 0, 0, 0].unique().numel() == 3  # ... and a different one for each image
    # offset 0 draws nothing more, so a run without it keeps its random stream
    a = gen.noisy(z0, torch.Generator().manual_seed(1))
    b = gen.noisy(z0, torch.Generator().manual_seed(1), offset=0.0)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    _, noise, _ = gen.noisy(z0, torch.Generator().manual_seed(1), offset=0.5)
    assert torch.allclose(noise - a[1], 0.5 * gen.constant_noise(z0.shape, _stream_after_noise(z0, 1)))
    x, y = _exp_tensors(mnist_small, 0)
    results = {}
    for name, extra in {"plain": {}, "offset": {"generator_noise_offset": 0.1}}.items():
        plugin = _plugin(generator_steps=3, seed=3, **extra)
        plugin.learn_classes(x, y)
        results[name] = _flat(plugin.generator.unet)
    assert not torch.equal(results["plain"], results["offset"])


def _stream_after_noise(z0, seed):
    """The random stream of ``noisy`` after its timesteps and white noise are drawn."""
    g = torch.Generator().manual_seed(seed)
    torch.randint(0, 1000, (z0.shape[0],), generator=g)
    torch.randn(z0.shape, generator=g)
    return g


def test_replay_draw_once_keeps_each_class_set(mnist_small, one_thread):
    """Each class is drawn once, the experience after it was learned, and the same images come back later."""
    plugin = _plugin(replay_draw="once", n_replay_per_class=6)
    plugin.learn_classes(*_exp_tensors(mnist_small, 0))
    plugin.begin_experience(1)
    x1, y1 = plugin.replay_set
    assert sorted(plugin.kept) == [0, 1] and plugin.kept[0].dtype == torch.uint8
    plugin.learn_classes(*_exp_tensors(mnist_small, 1))
    plugin.replay_record = None
    plugin.begin_experience(2)
    x2, y2 = plugin.replay_set
    assert sorted(plugin.kept) == [0, 1, 2, 3]
    assert torch.equal(x2[y2 <= 1], x1)  # the generator changed, the kept sets did not
    assert plugin.timer.seconds[(2, "generation")] > 0


def test_replayed_samples_are_the_kept_sets_of_old_classes(mnist_small, one_thread):
    """What the run's measurements (FID/KID, MMD gap, sample grids) draw: an old class's kept images, not the
    generator's fresh samples of it; a class with no kept set (just learned) or too small a one is sampled."""
    plugin = _plugin(replay_draw="once", n_replay_per_class=6)
    plugin.learn_classes(*_exp_tensors(mnist_small, 0))
    plugin.begin_experience(1)
    plugin.learn_classes(*_exp_tensors(mnist_small, 1))
    x, y = plugin.replayed_samples([0, 1, 2, 3], 4, seed=5)
    assert y.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4 and x.shape[0] == 16
    for k in (0, 1):
        assert torch.equal(x[y == k], plugin.kept[k][:4].float() / 255)
    fresh, _ = plugin.sample([2, 3], 4, seed=5)
    assert torch.equal(x[y >= 2], fresh)
    # more images than a kept set holds: the class is drawn from the generator instead
    x8, y8 = plugin.replayed_samples([0], 8, seed=5)
    assert torch.equal(x8, plugin.sample([0], 8, seed=5)[0]) and not torch.equal(x8[:6], plugin.kept[0].float() / 255)
    # the MMD gap plugin, standalone on this generator, measures a kept class on its kept images
    mmd = MMDPlugin(plugin, samples_per_class=4)
    assert torch.equal(mmd._synthetic_for(0, trained=2), plugin.kept[0][:4].float() / 255)


def test_replay_draw_redraw_draws_old_classes_again(mnist_small, one_thread):
    plugin = _plugin(replay_draw="redraw", n_replay_per_class=6)
    plugin.learn_classes(*_exp_tensors(mnist_small, 0))
    plugin.begin_experience(1)
    x1, _ = plugin.replay_set
    plugin.learn_classes(*_exp_tensors(mnist_small, 1))
    plugin.replay_record = None
    plugin.begin_experience(2)
    x2, y2 = plugin.replay_set
    assert not torch.equal(x2[y2 <= 1], x1)
    assert plugin.kept == {}


def test_cas_is_per_class_accuracy_of_a_classifier_trained_on_synthetic_images(mnist_small, one_thread):
    """Real images as the 'synthetic' set give a high CAS; shuffled labels give about chance."""
    xs, ys = map(torch.cat, zip(*(_exp_tensors(mnist_small, k) for k in range(2))))
    test = [dataset_tensors(e.dataset.eval()) for e in mnist_small.test_stream]
    xt, yt = torch.cat([x for x, _ in test]), torch.cat([y for _, y in test])
    good = classification_accuracy_score(xs, ys, xt, yt, epochs=10, batch_size=16, lr=0.01)
    assert sorted(good) == [0, 1, 2, 3]  # only the classes of the synthetic set; other real classes are ignored
    assert min(good.values()) > 0.7
    bad = classification_accuracy_score(xs, ys[torch.randperm(len(ys))], xt, yt, epochs=10, batch_size=16, lr=0.01)
    assert sum(bad.values()) / 4 < 0.6


def test_cas_confusion_says_which_class_the_real_images_are_taken_for(mnist_small, one_thread):
    """A set whose two classes' labels are swapped: the real 0s are taken for 1s and the 1s for 0s; every real
    image of the set's classes is counted once, and the diagonal is the CAS of the same classifier."""
    from avalanche_drcpsd.experiments.fidelity import cas_confusion

    xs, ys = _exp_tensors(mnist_small, 0)
    test = [dataset_tensors(e.dataset.eval()) for e in mnist_small.test_stream]
    xt, yt = torch.cat([x for x, _ in test]), torch.cat([y for _, y in test])
    swapped = 1 - ys
    classes, counts = cas_confusion(xs, swapped, xt, yt, epochs=10, batch_size=16, lr=0.01)
    assert classes == [0, 1]
    assert counts.sum(1).tolist() == [int((yt == 0).sum()), int((yt == 1).sum())]
    assert counts[0, 1] > 0.7 * counts[0].sum() and counts[1, 0] > 0.7 * counts[1].sum()
    cas = classification_accuracy_score(xs, swapped, xt, yt, epochs=10, batch_size=16, lr=0.01)
    assert cas == pytest.approx({k: float(counts[i, i] / counts[i].sum()) for i, k in enumerate(classes)})


def test_cas_classifier_anneals_its_rate_to_zero(monkeypatch):
    """schedule="cosine" (the default) runs step i of n at lr * (1 + cos(pi i / n)) / 2; "constant" keeps lr; a
    bad schedule is refused, naming it."""
    from avalanche_drcpsd.experiments.fidelity import FidelityError

    x, y = torch.rand(40, 1, 28, 28), torch.arange(40) % 2
    for schedule, expected in (("cosine", [0.05 * (1 + math.cos(math.pi * i / 6)) / 2 for i in range(6)]),
                               ("constant", [0.05] * 6)):
        rates = sgd_step_rates(monkeypatch)
        classification_accuracy_score(x, y, x, y, epochs=2, batch_size=16, schedule=schedule)  # 3 steps an epoch
        monkeypatch.undo()
        assert rates == pytest.approx(expected, abs=1e-12), schedule
    with pytest.raises(FidelityError, match="schedule='step'"):
        classification_accuracy_score(x, y, x, y, schedule="step")


def test_cas_rejects_mismatched_shapes():
    from avalanche_drcpsd.experiments.fidelity import FidelityError

    with pytest.raises(FidelityError, match="same"):
        classification_accuracy_score(torch.rand(4, 1, 28, 28), torch.arange(4), torch.rand(4, 3, 28, 28),
                                      torch.arange(4))


def test_channels_last_generator_trains_the_same_model_in_nhwc(mnist_small, one_thread, tmp_path):
    """generator_memory_format="channels_last" stores the UNet's convolution weights NHWC through training (and
    with its EMA on); the trained values are those of the contiguous run up to float
    rounding, and the saved generator loads as an ordinary one."""
    from avalanche_drcpsd.generator import DiffusionGenerator

    trained = {}
    for fmt in ("contiguous", "channels_last"):
        plugin = _plugin(generator_memory_format=fmt, generator_steps=3, generator_ema_decay=0.9)
        plugin.learn_classes(*_exp_tensors(mnist_small, 0))
        convs = [m.weight for m in plugin.generator.unet.modules() if isinstance(m, torch.nn.Conv2d)]
        nhwc = [w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs
                if w.shape[2:] != (1, 1)]
        assert nhwc and all(nhwc) == (fmt == "channels_last")
        trained[fmt] = plugin.generator
    torch.testing.assert_close(_flat(trained["channels_last"]), _flat(trained["contiguous"]), rtol=1e-3, atol=1e-4)
    trained["channels_last"].save_pretrained(tmp_path / "gen")
    loaded = DiffusionGenerator.from_pretrained(tmp_path / "gen")
    torch.testing.assert_close(_flat(loaded), _flat(trained["channels_last"]), rtol=0, atol=0)


@pytest.mark.parametrize("overrides, field", [
    ({"replay_draw": "redraw"}, "replay_draw"), ({"cpsd_order": "before_generator"}, "cpsd_order"),
    ({"generator_distill_weight": 1.0}, "generator_distill_weight"), ({"generator_scope": "each"}, "generator_scope"),
])
def test_per_experience_generator_refuses_what_it_cannot_do(overrides, field):
    values = {"generator_scope": "per_experience", "replay_draw": "once", "generator_distill_weight": 0.0, **overrides}
    with pytest.raises(ConfigError, match=field):
        DRCPSDConfig(**values).validate()


def test_per_experience_generator_starts_each_experience_from_scratch(mnist_small, one_thread, monkeypatch):
    """generator_scope="per_experience": experience 1's generator starts from the weights a generator seeded with
    seed + 1 is built with (not experience 0's), gets generator_first_steps, and the old classes' kept sets are
    drawn from experience 0's generator before it is replaced, whether or not begin_experience ran."""
    import avalanche_drcpsd.plugins.generator as module

    starts, steps = [], []

    def spy(gen, *args, **kwargs):
        starts.append(_flat(gen.unet))
        steps.append(kwargs["steps"])
        return train(gen, *args, **kwargs)

    train = module.train_generator
    monkeypatch.setattr(module, "train_generator", spy)
    common = dict(replay_draw="once", generator_distill_weight=0.0, n_replay_per_class=6, generator_first_steps=5)
    continual = _plugin(**common)
    continual.learn_classes(*_exp_tensors(mnist_small, 0))
    continual.begin_experience(1)
    plugin = _plugin(generator_scope="per_experience", **common)
    plugin.learn_classes(*_exp_tensors(mnist_small, 0))
    first = plugin.generator
    plugin._exp = 1  # learn_classes without begin_experience: the kept sets must still come from `first`
    plugin.learn_classes(*_exp_tensors(mnist_small, 1))
    assert plugin.generator is not first and sorted(plugin.kept) == [0, 1]
    assert all(torch.equal(plugin.kept[k], continual.kept[k]) for k in (0, 1))
    seeded = _plugin(seed=1, **common)
    seeded.learn_classes(*_exp_tensors(mnist_small, 0))
    # calls: continual exp 0, plugin exp 0, plugin exp 1, seeded exp 0
    assert torch.equal(starts[2], starts[3])  # experience 1 of seed 0 starts where experience 0 of seed 1 does
    assert not torch.equal(starts[2], starts[1])
    assert steps == [5, 5, 5, 5] and plugin.generator_steps([2, 3]) == 5 and continual.generator_steps([2, 3]) == 4
