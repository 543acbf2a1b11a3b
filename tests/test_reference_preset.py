"""The ``reference`` preset is the original CPSD code's settings, and each option it needs does what the original
code does, on hand-checked tiny cases (issue 14; the original: isaacNingLee/CPSD at 769e79b)."""

import copy

import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from test_plugins import MLP, BNNet, FakeSource
from torch import nn

from avalanche_drcpsd import CPSDProjection, DRCPSDConfig, DreamReplayPlugin, SeenClassMaskPlugin
from avalanche_drcpsd.augment import (
    color_jitter,
    jpeg_round_trip,
    random_resized_crop_flip,
    random_shift,
    reference_classifier_augment,
)
from avalanche_drcpsd.config import ConfigError
from avalanche_drcpsd.losses import feature_distillation_loss
from avalanche_drcpsd.plugins.logit_mask import MASKED_LOGIT, SeenClassMask

#: read in the original code, not in this package (file and line of 769e79b)
ORIGINAL = {
    "prompt_template": "{}",            # manager.py l. 578-581: the class name (+ a BLIP-2 caption)
    "projection": "reference",          # train_cpsd.py l. 380: embed_trans(h.reshape(-1, 77))
    "cpsd_lr": 4e-4,                    # l. 202-205: 1e-4 x batch 4 under --cpsd_scale_lr
    "cpsd_weight_decay": 0.01,          # parse_args.py l. 68
    "cpsd_batch_size": 4, "cpsd_epochs": 1, "cpsd_augment": "reference",  # run_cifar10.sh; l. 256-264
    "lambda_mmd": 0.003, "mmd_kind": "mean", "snr_gamma": 5.0,           # l. 403-423
    "sampler": "dpm", "sampling_steps": 20, "guidance_scale": (5.0, 9.0),  # main.py l. 59-60; manager.py l. 587
    "n_replay_per_class": 6000,         # run_cifar10.sh l. 19
    "replay_draw": "once", "replay_classes": "seen",   # --shared_gen_replay: main.py l. 146-157, manager.py l. 634
    "replay_augment": "reference",      # .jpeg files; manager.py l. 57-62
    "replay_bn": "joint",               # backbone.py observe(): self(x_cat), x_cat = torch.cat([x, gen_x])
    "replay_epochs": 1, "replay_epoch_length": "shorter",  # train.py l. 372: zip(...)
    "replay_batch_real": 16, "replay_batch_syn": 16,       # c_batch_size 32 // 2 each
    "replay_optimizer": "continue", "replay_lr": None,     # train.py l. 264-265
    "kappa": 0.05, "kappa_schedule": "constant",           # backbone.py l. 439: 0.1 * (1 - mem_alpha)
    "pi": 0.5, "distill_old_weight": 0.5, "distill_targets": "both",  # l. 436, both teachers on x_cat
    "replay_kd_weight": 0.0, "student_init": "average", "student_bn": "new",  # l. 292-298
    "replay_step_ema": None,            # --c_ema off
    "logit_mask": "seen",               # l. 257: fc(z)[:, :class_range]
    "teacher_mode": "student",          # teachers are submodules of the student
}


def test_reference_preset_is_the_original_codes_settings_field_by_field():
    ref = DRCPSDConfig.reference()
    for name, value in ORIGINAL.items():
        assert getattr(ref, name) == value, name
    default = DRCPSDConfig()
    assert all(getattr(ref, f) == getattr(default, f) for f in ("generator_steps", "unet_block_out_channels"))
    # overrides win, and a preset in a JSON experiment file is the same thing
    assert DRCPSDConfig.reference(kappa=1.0).kappa == 1.0
    assert DRCPSDConfig.from_dict({"preset": "reference", "seed": 3}) == DRCPSDConfig.reference(seed=3)
    with pytest.raises(ConfigError, match="preset='original'"):
        DRCPSDConfig.from_dict({"preset": "original"})


@pytest.mark.parametrize("field, value", [
    ("projection", "both"), ("cpsd_augment", "yes"), ("replay_augment", "jpeg"), ("replay_epoch_length", "zip"),
    ("student_bn", "old"), ("logit_mask", "all"), ("teacher_mode", "train"), ("replay_optimizer", "sgd"),
    ("replay_step_ema", 0.0), ("replay_step_ema", 1.5), ("cpsd_weight_decay", -0.1), ("distill_old_weight", -1),
])
def test_bad_reference_option_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        DRCPSDConfig(**{field: value})


def test_continued_optimizer_refuses_a_replay_lr():
    with pytest.raises(ConfigError, match="replay_lr=0.01"):
        DRCPSDConfig(replay_optimizer="continue", replay_lr=0.01)


def test_reference_projection_maps_runs_of_L_consecutive_values():
    """(L, D) = (3, 2): the flattened states 0..5 are cut into [0 1 2] [3 4 5]; a W that reverses a run gives
    [2 1 0] [5 4 3], i.e. [[2, 1], [0, 5], [4, 3]]; the token form with the same W reverses the tokens."""
    tokens = torch.arange(6.0).reshape(1, 3, 2)
    reverse = torch.eye(3).flip(0)
    out = {}
    for mode in ("reference", "token"):
        proj = CPSDProjection(3, 2, mode)
        torch.testing.assert_close(proj(tokens), tokens)  # identity at initialisation
        with torch.no_grad():
            proj.linear.weight.copy_(reverse)
        out[mode] = proj(tokens)
    assert out["reference"].tolist() == [[[2.0, 1.0], [0.0, 5.0], [4.0, 3.0]]]
    assert out["token"].tolist() == [[[4.0, 5.0], [2.0, 3.0], [0.0, 1.0]]]


def test_old_teacher_weight_scales_its_term():
    h, a, b = torch.zeros(2, 4), torch.ones(2, 4), 2 * torch.ones(2, 4)
    assert float(feature_distillation_loss(h, a, h, b, pi=0.5, old_weight=0.5)) == pytest.approx(0.5 * 1 + 0.5 * 4)


def test_student_bn_new_keeps_the_new_teachers_running_statistics():
    old, new = BNNet(), BNNet()
    with torch.no_grad():
        old.body[2].running_mean.fill_(1.0)
        new.body[2].running_mean.fill_(3.0)
    for bn, expected in (("average", 2.0), ("new", 3.0)):
        state = DreamReplayPlugin(FakeSource([]), student_bn=bn, verbose=False).initial_student(old, new)
        assert torch.all(state["body.2.running_mean"] == expected), bn
        w = state["body.1.weight"]
        torch.testing.assert_close(w, 0.5 * (old.body[1].weight + new.body[1].weight))  # weights: averaged


def _naive(model, plugins, lr=0.05):
    ev = EvaluationPlugin(accuracy_metrics(stream=True), loggers=[])
    return Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr), criterion=nn.CrossEntropyLoss(),
                 train_mb_size=16, train_epochs=1, eval_mb_size=64, plugins=plugins, evaluator=ev)


def test_step_ema_moves_the_student_a_tenth_of_each_step(mnist_small, monkeypatch):
    """With step_ema=0.1 every replay step leaves theta_before + 0.1 * (the optimiser's step)."""
    replay = DreamReplayPlugin(FakeSource([]), n_replay_per_class=4, batch_real=16, batch_syn=4, step_ema=0.1,
                               optimizer="continue", verbose=False)
    strategy = _naive(MLP(), [replay])
    strategy.train(mnist_small.train_stream[0])
    checks = []
    original_step = torch.optim.SGD.step

    def step(self, *args, **kwargs):
        if strategy.model.training and replay.distill.new_teacher is not None:
            before = [p.detach().clone() for p in strategy.model.parameters()]
            proposed = [p.detach() - self.param_groups[0]["lr"] * p.grad for p in strategy.model.parameters()]
            checks.append((before, proposed))
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    strategy.train(mnist_small.train_stream[1])
    assert checks, "no replay step was taken"
    # the last replay step: after it, the model is 0.9 * before + 0.1 * proposed
    before, proposed = checks[-1]
    for p, b, q in zip(strategy.model.parameters(), before, proposed):
        torch.testing.assert_close(p.detach(), 0.9 * b + 0.1 * q, rtol=1e-5, atol=1e-6)


def test_shorter_epoch_length_stops_with_the_shorter_set(mnist_small):
    counts = {}
    for length in ("longer", "shorter"):
        replay = DreamReplayPlugin(FakeSource([]), n_replay_per_class=2, batch_real=8, batch_syn=2,
                                   epoch_length=length, verbose=False)
        strategy = _naive(MLP(), [replay])
        for k in (0, 1):
            strategy.train(mnist_small.train_stream[k])
        counts[length] = replay.replayed_batches
    real_batches = len(mnist_small.train_stream[1].dataset) // 8
    syn_batches = 2 * 2 // 2  # 2 old classes x 2 images, batch 2
    assert counts == {"longer": real_batches, "shorter": syn_batches}


@pytest.mark.parametrize("mode", ["student", "eval"])
def test_teacher_mode_and_continued_optimizer(mnist_small, monkeypatch, mode):
    """teacher_mode="student" runs the teachers in train mode, so their BatchNorm statistics move during replay
    (the original's submodule teachers); "eval" keeps them. optimizer="continue" replays with the strategy's own
    optimiser."""
    replay = DreamReplayPlugin(FakeSource([]), n_replay_per_class=8, batch_real=16, batch_syn=8, optimizer="continue",
                               teacher_mode=mode, verbose=False)
    strategy = _naive(BNNet(), [replay])
    strategy.train(mnist_small.train_stream[0])
    seen = {}
    monkeypatch.setattr(replay, "_make_optimizer", lambda s: pytest.fail("a fresh optimiser was made"))
    original = replay.distill.set_new_teacher

    def spy(model):
        original(model)
        seen["new_mean"] = replay.distill.new_teacher.body[2].running_mean.clone()

    monkeypatch.setattr(replay.distill, "set_new_teacher", spy)
    strategy.train(mnist_small.train_stream[1])
    moved = not torch.equal(seen["new_mean"], replay.distill.new_teacher.body[2].running_mean)
    assert moved == (mode == "student")
    assert not replay.distill.new_teacher.training  # back in eval mode after replay


def test_seen_class_mask_hides_future_classes_in_training_and_evaluation(mnist_small):
    model = MLP()
    strategy = _naive(model, [SeenClassMaskPlugin()])
    strategy.train(mnist_small.train_stream[0])  # classes 0, 1
    x = torch.rand(3, 1, 28, 28)
    model.eval()
    out = model(x)
    assert torch.all(out[:, 2:] == MASKED_LOGIT) and torch.all(out[:, :2] > MASKED_LOGIT)
    teacher = copy.deepcopy(model)  # a teacher keeps the mask it was copied with
    strategy.train(mnist_small.train_stream[1])
    assert torch.all(model(x)[:, 4:] == MASKED_LOGIT) and torch.all(model(x)[:, 2:4] > MASKED_LOGIT)
    assert torch.all(teacher(x)[:, 2:] == MASKED_LOGIT)
    results = strategy.eval(mnist_small.test_stream[:2])
    assert results  # evaluation runs through the mask
    assert SeenClassMask([])(model, None, torch.zeros(2, 10)).eq(0).all()  # no class seen: no mask


def test_unseen_class_rows_get_no_gradient_under_the_mask():
    model = MLP()
    hook = SeenClassMask([0, 1])
    model.register_forward_hook(hook)
    loss = nn.functional.cross_entropy(model(torch.rand(4, 1, 28, 28)), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    assert torch.all(model.head.weight.grad[2:] == 0) and torch.any(model.head.weight.grad[:2] != 0)


def test_augmentations_keep_shape_range_and_follow_their_generator():
    x = torch.rand(4, 1, 12, 12)
    flipped = random_resized_crop_flip(x, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=1.0)
    torch.testing.assert_close(flipped, x.flip(-1), rtol=0, atol=1e-6)  # whole-image crop, always flipped
    a = reference_classifier_augment(x, torch.Generator().manual_seed(0))
    b = reference_classifier_augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape and 0 <= float(a.min()) and float(a.max()) <= 1
    assert not torch.equal(a, reference_classifier_augment(x, torch.Generator().manual_seed(1)))
    bright = color_jitter(torch.full((1, 1, 4, 4), 0.5), brightness=0.4, contrast=0.0, saturation=0.0, hue=0.0,
                          generator=torch.Generator().manual_seed(0))
    assert 0.3 <= float(bright.mean()) <= 0.7 and float(bright.std()) < 1e-6  # one factor for the whole image


def test_jpeg_round_trip_is_lossy_but_close():
    x = torch.linspace(0, 1, 28).view(1, 1, 1, 28).expand(2, 1, 28, 28).contiguous()
    y = jpeg_round_trip(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert 0 < float((y - x).abs().mean()) < 0.05
    with pytest.raises(ValueError, match="1 or 3 channels"):
        jpeg_round_trip(torch.rand(1, 2, 8, 8))


def test_random_shift_is_a_crop_of_the_border_replicated_image():
    """Each image is some window of its border-replicated pad (a shift of at most max_shift per axis); no value
    leaves the image's own range (normalised inputs stay valid); 0 pixels is the identity, flip=1 the mirror."""
    x = torch.randn(16, 2, 9, 7)
    out = random_shift(x, max_shift=2, generator=torch.Generator().manual_seed(0))
    padded = nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    windows = [(dy, dx) for dy in range(5) for dx in range(5)]
    for i in range(len(x)):
        hits = [w for w in windows if torch.equal(out[i], padded[i, :, w[0]:w[0] + 9, w[1]:w[1] + 7])]
        assert hits, f"image {i} is no shift of its input"
        assert float(out[i].min()) >= float(x[i].min()) and float(out[i].max()) <= float(x[i].max())
    assert not torch.equal(out, x)  # 16 images: some are moved
    assert torch.equal(out, random_shift(x, max_shift=2, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(random_shift(x, max_shift=0), x)
    assert torch.equal(random_shift(x, max_shift=0, flip=1.0), x.flip(-1))
    with pytest.raises(ValueError, match="max_shift=-1"):
        random_shift(x, max_shift=-1)


def test_replay_augment_choices_are_the_augmentations_the_plugin_knows():
    from avalanche_drcpsd.augment import REPLAY_AUGMENTS
    from avalanche_drcpsd.config import CHOICES

    assert CHOICES["replay_augment"] == ("none", *REPLAY_AUGMENTS)
    with pytest.raises(ConfigError, match="replay_augment.*'shfit'"):
        DRCPSDConfig(replay_augment="shfit")


def test_cpsd_phase_uses_the_weight_decay_and_the_augmentation(mnist_small, monkeypatch, one_thread):
    """cpsd_weight_decay reaches the projection's AdamW, and cpsd_augment="reference" transforms every CPSD batch
    (and nothing else: the generator phase trains on the images as they are)."""
    from conftest import tiny_config

    import avalanche_drcpsd.plugins.generator as gp_module
    from avalanche_drcpsd import CPSDGeneratorPlugin
    from avalanche_drcpsd.utils import dataset_tensors

    calls, decays = [], []
    original_aug = gp_module.reference_cpsd_augment

    def aug(batch, generator=None):
        calls.append(batch.shape[0])
        return original_aug(batch, generator)

    original_adamw = torch.optim.AdamW

    def adamw(params, **kwargs):
        decays.append(kwargs.get("weight_decay"))
        return original_adamw(params, **kwargs)

    monkeypatch.setattr(gp_module, "reference_cpsd_augment", aug)
    monkeypatch.setattr(torch.optim, "AdamW", adamw)
    plugin = CPSDGeneratorPlugin(tiny_config(cpsd_augment="reference", cpsd_weight_decay=0.01,
                                             cpsd_max_images_per_class=8, cpsd_batch_size=4), verbose=False)
    plugin.learn_classes(*dataset_tensors(mnist_small.train_stream[0].dataset.eval()))
    assert calls == [4, 4, 4, 4]  # 2 classes x 8 images in batches of 4
    assert 0.01 in decays  # the projections' optimiser (the generator's has weight decay 0)


@pytest.mark.parametrize("augment", ["reference", "shift"])
def test_only_the_reference_replay_augment_jpegs_the_drawn_set(mnist_small, one_thread, augment):
    """The original code's samples are .jpeg files: "reference" passes each drawn image through a JPEG; the
    package's shifts leave the drawn sets as the generator made them."""
    from conftest import tiny_config

    from avalanche_drcpsd import CPSDGeneratorPlugin
    from avalanche_drcpsd.synthetic_cache import to_uint8
    from avalanche_drcpsd.utils import dataset_tensors

    plugin = CPSDGeneratorPlugin(tiny_config(replay_augment=augment), verbose=False)
    plugin.learn_classes(*dataset_tensors(mnist_small.train_stream[0].dataset.eval()))
    x, y = plugin.sample_replay([0, 1], 4)
    raw, raw_y = plugin.sample([0, 1], 4)
    kept = jpeg_round_trip(raw) if augment == "reference" else to_uint8(raw).float() / 255  # kept as 8-bit images
    assert torch.equal(y, raw_y) and torch.equal(x, kept)


@pytest.mark.parametrize("augment", ["reference", "shift", "shift_flip"])
def test_replay_augment_transforms_every_synthetic_batch_and_no_real_image(mnist_small, monkeypatch, augment):
    """Each replay_augment reaches the replay plugin and transforms the synthetic half (never the real one) of
    every replay batch."""
    import avalanche_drcpsd.plugins.dream_replay as dr_module
    from avalanche_drcpsd.config import ReplayConfig

    assert ReplayConfig.from_config(DRCPSDConfig(replay_augment=augment)).augment == augment
    batches = []
    original = dr_module.REPLAY_AUGMENTS[augment]
    monkeypatch.setitem(dr_module.REPLAY_AUGMENTS, augment,
                        lambda xs, generator=None: batches.append(xs.shape[0]) or original(xs, generator=generator))
    replay = DreamReplayPlugin(FakeSource([]), n_replay_per_class=8, batch_real=16, batch_syn=8, augment=augment,
                               verbose=False)
    strategy = _naive(MLP(), [replay])
    for k in (0, 1):
        strategy.train(mnist_small.train_stream[k])
    assert batches and len(batches) == replay.replayed_batches and set(batches) == {8}


def test_every_shipped_experiment_file_loads_and_the_reference_one_holds_the_preset():
    """Each experiments/*.json is a valid ExperimentConfig; split_mnist_cpu_reference.json keeps every preset
    field it does not override (its overrides: the offline generator's budget and the CPU profile's sampling)."""
    import json
    from pathlib import Path

    from avalanche_drcpsd.config import REFERENCE
    from avalanche_drcpsd.experiments.run import ExperimentConfig

    folder = Path(__file__).resolve().parents[1] / "experiments"
    files = sorted(folder.glob("*.json"))
    assert files
    for path in files:
        ExperimentConfig.from_json(str(path))
    path = folder / "split_mnist_cpu_reference.json"
    raw = json.loads(path.read_text())["drcpsd"]
    cfg = ExperimentConfig.from_json(str(path)).drcpsd
    for name, value in REFERENCE.items():
        if name not in raw:
            assert getattr(cfg, name) == value, name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_a_cuda_device_without_cuda_fails_before_anything_is_built(monkeypatch):
    """device='cuda:0' on a CPU-only machine: a ConfigError naming the device, from the strategy's constructor and
    from the generator plugin's setup (issue 15), while the config itself still loads (experiment files for a GPU
    machine stay readable)."""
    from conftest import tiny_config

    from avalanche_drcpsd import DRCPSD, CPSDGeneratorPlugin
    from avalanche_drcpsd.config import check_device

    cfg = tiny_config(device="cuda:0")
    with pytest.raises(ConfigError, match="device='cuda:0' but CUDA is not available"):
        check_device("cuda:0")
    model = MLP()
    with pytest.raises(ConfigError, match="device='cuda:0'"):
        DRCPSD(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=cfg, verbose=False)
    with pytest.raises(ConfigError, match="device='cuda:0'"):
        CPSDGeneratorPlugin(cfg, verbose=False).setup()
    check_device("cpu")


def _generation_calls(mnist_small, monkeypatch, n_per_class, **config):
    """A plugin of ``tiny_config(**config)`` that learned classes 0 and 1, and the keyword arguments of every
    generator call its ``sample([0, 1], n_per_class)`` made."""
    from conftest import tiny_config

    from avalanche_drcpsd import CPSDGeneratorPlugin
    from avalanche_drcpsd.utils import dataset_tensors

    plugin = CPSDGeneratorPlugin(tiny_config(**config), verbose=False)
    plugin.learn_classes(*dataset_tensors(mnist_small.train_stream[0].dataset.eval()))
    calls = []
    original = plugin.generator.sample

    def spy(cond, null, **kwargs):
        calls.append(kwargs)
        return original(cond, null, **kwargs)

    monkeypatch.setattr(plugin.generator, "sample", spy)
    plugin.sample([0, 1], n_per_class)
    return plugin, calls


@pytest.mark.parametrize("draw", ["image", "batch"])
def test_guidance_is_drawn_per_image_or_per_generation_batch(mnist_small, monkeypatch, one_thread, draw):
    """``guidance_draw="batch"`` (the original: one U(5, 9) scale per pipeline call): each generation batch gets
    one float scale from the range; ``image`` hands the range to the generator, which draws one per image."""
    plugin, calls = _generation_calls(mnist_small, monkeypatch, 7, guidance_scale=(5.0, 9.0), guidance_draw=draw,
                                      sample_batch_size=3)  # 3 + 3 + 1 images per class
    scales = [kw["guidance_scale"] for kw in calls]
    assert len(scales) == 6
    if draw == "batch":
        assert all(isinstance(s, float) and 5.0 <= s <= 9.0 for s in scales)
        assert len(set(scales)) == 6, "a new scale for every batch"
        assert plugin.cache_settings([0], 7, 0)["guidance_draw"] == "batch"
    else:
        assert all(s == (5.0, 9.0) for s in scales)
        assert "guidance_draw" not in plugin.cache_settings([0], 7, 0), "earlier caches' manifests still match"


def test_guidance_interval_reaches_the_generator_and_names_the_cached_sets(mnist_small, monkeypatch, one_thread):
    """The plugin hands ``guidance_interval`` to every generation call and writes it into the synthetic cache's
    manifest only when set (the manifests of caches made before it still match)."""
    plugin, calls = _generation_calls(mnist_small, monkeypatch, 4, guidance_interval=[0.0, 0.5], sample_batch_size=4)
    assert plugin.config.guidance_interval == (0.0, 0.5)
    assert [kw["guidance_interval"] for kw in calls] == [(0.0, 0.5), (0.0, 0.5)]
    assert plugin.cache_settings([0], 4, 0)["guidance_interval"] == [0.0, 0.5]
    monkeypatch.setattr(plugin, "config", plugin.config.replace(guidance_interval=None))
    assert "guidance_interval" not in plugin.cache_settings([0], 4, 0)


@pytest.mark.parametrize("value", [(0.5, 0.2), (0.0, 1.5), (-0.1, 0.5), (0.2,), "middle"])
def test_bad_guidance_interval_names_the_value(value):
    with pytest.raises(ConfigError, match="guidance_interval"):
        DRCPSDConfig(guidance_interval=value)

