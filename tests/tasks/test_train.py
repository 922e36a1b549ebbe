import pandas as pd
import pytest
import torch

from kiln.config import AugmentConfig, TrainConfig
from kiln.models import MODEL_FAMILIES, ModelSpec, build_model, load_model
from kiln.training import resolve_runtime
from tasks.augment import augment
from tasks.train import train
from tests.conftest import copy_outputs


@pytest.fixture
def policy_ref(store, dataset_ref):
    return augment(AugmentConfig(policy="none"), dataset_ref, store)


def test_training_lowers_the_loss_and_saves_a_loadable_model(store, dataset_ref, policy_ref):
    config = TrainConfig(epochs=4, batch_size=16, lr=3e-3)
    ref = train(config, dataset_ref, policy_ref, store)
    out = store.materialize(ref)
    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == [1, 2, 3, 4]
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    model, spec = load_model(out)
    assert spec == ModelSpec("simple_cnn", (8, 8, 3), 3)
    assert model(torch.zeros(2, 3, 8, 8)).shape == (2, 3)
    metrics = store.manifest(ref).metrics
    assert metrics["device"] == "cpu" and metrics["epochs"] == 4
    # per-epoch monitoring uses a stratified slice of train (3 classes x 24 -> 2 each held out), never the test split
    assert (metrics["train_samples"], metrics["validation_samples"]) == (66, 6)
    assert history["val_accuracy"].between(0, 1).all()
    assert not (store.scratch_dir("train", ref.key) / "checkpoint.pt").exists()


def test_validation_can_be_switched_off(store, dataset_ref, policy_ref):
    ref = train(TrainConfig(epochs=1, batch_size=32, validation_fraction=0), dataset_ref, policy_ref, store)
    assert store.manifest(ref).metrics["train_samples"] == 72
    assert pd.read_csv(store.materialize(ref) / "history.csv")["val_accuracy"].isna().all()


def test_second_run_is_reused(store, dataset_ref, policy_ref):
    config = TrainConfig(epochs=1, batch_size=32)
    first = train(config, dataset_ref, policy_ref, store)
    second = train(config, dataset_ref, policy_ref, store, on_epoch=lambda row: pytest.fail("retrained"))
    assert second.reused and second.digest == first.digest


def test_resumes_from_the_last_checkpoint(store, dataset_ref, policy_ref, tmp_path):
    """A run that dies after epoch 2 of 3 resumes at epoch 3 on the next call."""
    config = TrainConfig(epochs=3, batch_size=32)
    seen = []

    def die_after_two(row):
        seen.append(row["epoch"])
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, dataset_ref, policy_ref, store, on_epoch=die_after_two)
    resumed = []
    ref = train(config, dataset_ref, policy_ref, store, on_epoch=lambda row: resumed.append(row["epoch"]))
    assert seen == [1, 2] and resumed == [3]
    assert list(pd.read_csv(store.materialize(ref) / "history.csv")["epoch"]) == [1, 2, 3]
    # the resumed run ends with exactly the weights of one that was never interrupted
    other_store, (other_dataset, other_policy) = copy_outputs(store, [dataset_ref, policy_ref], tmp_path / "other")
    uninterrupted = train(config, other_dataset, other_policy, other_store)
    resumed_weights = load_model(store.materialize(ref))[0].state_dict()
    straight_weights = load_model(other_store.materialize(uninterrupted))[0].state_dict()
    assert all(torch.equal(resumed_weights[name], straight_weights[name]) for name in straight_weights)


def test_gpu_only_options_degrade_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    runtime = resolve_runtime("cuda", "fp16")
    assert runtime.device.type == "cpu" and runtime.precision == "fp32"
    assert any("no CUDA device" in note for note in runtime.notes)
    assert resolve_runtime("auto", "auto").precision == "fp32"
    assert resolve_runtime("cpu", "bf16").precision == "bf16"


@pytest.mark.parametrize("name", sorted(MODEL_FAMILIES))
@pytest.mark.parametrize("shape", [(8, 8, 1), (28, 28, 1), (32, 32, 3)])
def test_every_model_fits_every_common_shape(name, shape):
    model = build_model(ModelSpec(name, shape, 10))
    height, width, channels = shape
    assert model(torch.zeros(2, channels, height, width)).shape == (2, 10)


def test_bf16_autocast_trains_on_cpu(store, dataset_ref, policy_ref):
    ref = train(TrainConfig(epochs=1, batch_size=32, precision="bf16"), dataset_ref, policy_ref, store)
    assert store.manifest(ref).metrics["precision"] == "bf16"


class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (print, ("this would have run arbitrary code",))


def test_weights_that_are_not_plain_tensors_are_refused(store, dataset_ref, policy_ref, capsys):
    """A weights.pt replaced by a malicious pickle is never unpickled (weights_only=True)."""
    from kiln.errors import IntegrityError

    out = store.materialize(train(TrainConfig(epochs=1, batch_size=32), dataset_ref, policy_ref, store))
    torch.save({"layer.weight": _RunsCodeWhenUnpickled()}, out / "weights.pt")
    with pytest.raises(IntegrityError, match="not a plain tensor state_dict.*refusing to load it"):
        load_model(out)
    assert "arbitrary code" not in capsys.readouterr().out


@pytest.mark.parametrize("total_steps", [1, 2, 4, 5, 9, 400])
def test_the_onecycle_schedule_warms_up_then_decays_to_zero_for_any_length(total_steps):
    """A few batches of a small dataset used to divide by zero in torch's OneCycleLR (warm-up of one step)."""
    from kiln.training import make_scheduler

    config = TrainConfig(schedule="onecycle", lr=0.2, warmup_fraction=0.2, optimizer="sgd", momentum=0.85)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.lr, momentum=config.momentum)
    scheduler = make_scheduler(optimizer, config, total_steps)
    rates = [scheduler.get_last_lr()[0]]
    for _ in range(total_steps):
        optimizer.step()
        scheduler.step()
        rates.append(scheduler.get_last_lr()[0])
    used = rates[:total_steps]  # the rate of each step taken; rates[total_steps] would be the next one's
    peak = used.index(max(used))
    assert used[0] == pytest.approx(config.lr / 25) and max(used) <= config.lr
    assert used[: peak + 1] == sorted(used[: peak + 1]) and used[peak:] == sorted(used[peak:], reverse=True)
    if total_steps >= 2:
        assert max(used) == pytest.approx(config.lr) and rates[total_steps] == 0.0
    assert optimizer.param_groups[0]["momentum"] == config.momentum


def test_norm_and_bias_parameters_train_at_bias_lr_scale_without_decay_through_the_schedule():
    from kiln.training import make_optimizer, make_scheduler

    config = TrainConfig(model="fastnet", optimizer="sgd", lr=0.5, weight_decay=5e-4, bias_lr_scale=64, momentum=0.85)
    model = build_model(ModelSpec("fastnet", (8, 8, 3), 4))
    optimizer = make_optimizer(model, config)
    weights, shifts = optimizer.param_groups
    assert (weights["lr"], weights["weight_decay"]) == (0.5, 5e-4)
    assert (shifts["lr"], shifts["weight_decay"]) == (0.5 * 64, 0.0)
    assert all(p.ndim > 1 for p in weights["params"]) and all(p.ndim <= 1 for p in shifts["params"])
    assert not any(p is model.whiten.weight for p in weights["params"] + shifts["params"])  # frozen: left out
    scheduler = make_scheduler(optimizer, config, total_steps=10)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    ratio = scheduler.get_last_lr()[1] / scheduler.get_last_lr()[0]
    assert ratio == pytest.approx(64)  # one schedule scales both groups


def test_decay_biases_shrinks_norm_shifts_by_the_same_amount_per_step_as_the_weights():
    """airbench's weight decay: every parameter loses the same fraction per step, whatever its learning rate."""
    from kiln.training import make_optimizer

    model = build_model(ModelSpec("fastnet", (8, 8, 3), 4))
    config = TrainConfig(model="fastnet", optimizer="sgd", lr=0.5, weight_decay=0.01, bias_lr_scale=64, momentum=0,
                         decay_biases=True)  # fmt: skip
    weights, shifts = make_optimizer(model, config).param_groups
    assert shifts["weight_decay"] == pytest.approx(0.01 / 64)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(1.0)
            parameter.grad = None if not parameter.requires_grad else torch.zeros_like(parameter)
    make_optimizer(model, config).step()  # zero gradients: only the decay moves anything
    for group in (weights, shifts):
        for parameter in group["params"]:
            assert torch.allclose(parameter, torch.full_like(parameter, 1 - 0.5 * 0.01)), group["lr"]
    assert torch.equal(model.whiten.weight, torch.ones_like(model.whiten.weight))  # frozen: not decayed either


def test_the_whitening_bias_gets_its_own_group_at_the_base_lr_that_stops_after_its_epochs():
    from kiln.training import WHITENING_BIAS_GROUP, make_optimizer, make_scheduler

    config = TrainConfig(model="fastnet", optimizer="sgd", lr=0.5, bias_lr_scale=64, epochs=4, whiten_bias_epochs=1,
                         schedule="constant")  # fmt: skip
    model = build_model(ModelSpec("fastnet", (8, 8, 3), 4))
    optimizer = make_optimizer(model, config)
    weights, shifts, whitening = optimizer.param_groups
    assert whitening["name"] == WHITENING_BIAS_GROUP and whitening["params"] == [model.whiten.bias]
    assert (whitening["lr"], whitening["weight_decay"]) == (0.5, 0.0)
    assert not any(p is model.whiten.bias for p in shifts["params"])
    scheduler = make_scheduler(optimizer, config, total_steps=12)  # 3 steps an epoch
    rates = []
    for _ in range(12):
        rates.append(scheduler.get_last_lr())
        optimizer.step()
        scheduler.step()
    assert [rate[2] for rate in rates] == [0.5] * 3 + [0.0] * 9
    assert [rate[1] for rate in rates] == [32.0] * 12  # the other groups keep their schedule
    plain = make_optimizer(model, config.model_copy(update={"whiten_bias_epochs": None}))
    assert len(plain.param_groups) == 2 and any(p is model.whiten.bias for p in plain.param_groups[1]["params"])


def test_the_shift_lr_to_zero_whitening_schedule_starts_at_the_shifts_lr_and_falls_linearly_to_zero():
    """airbench's Muon record: the whitening bias at the norm shifts' lr, falling to zero over its epochs whatever the
    run's schedule does, and decayed by the same amount per step as every other parameter."""
    from kiln.training import make_optimizer, make_scheduler

    config = TrainConfig(model="fastnet", optimizer="sgd", lr=0.5, bias_lr_scale=64, epochs=4, whiten_bias_epochs=2,
                         whiten_bias_schedule="shift_lr_to_zero", weight_decay=0.01, decay_biases=True,
                         schedule="onecycle", warmup_fraction=0.25, initial_lr_fraction=0.5)  # fmt: skip
    model = build_model(ModelSpec("fastnet", (8, 8, 3), 4))
    optimizer = make_optimizer(model, config)
    weights, shifts, whitening = optimizer.param_groups
    assert (whitening["lr"], whitening["weight_decay"]) == (32.0, pytest.approx(0.01 / 64))
    assert whitening["lr"] * whitening["weight_decay"] == pytest.approx(weights["lr"] * weights["weight_decay"])
    scheduler = make_scheduler(optimizer, config, total_steps=12)  # 3 steps an epoch: the bias trains for 6
    rates = []
    for _ in range(12):
        rates.append(scheduler.get_last_lr())
        optimizer.step()
        scheduler.step()
    assert [rate[2] for rate in rates] == pytest.approx([32.0 * (1 - step / 6) for step in range(6)] + [0.0] * 6)
    assert rates[0][0] == pytest.approx(0.25) and max(rate[0] for rate in rates) == pytest.approx(0.5)  # warm-up


def test_a_whitening_schedule_without_whiten_bias_epochs_is_refused():
    from kiln.config import load_config
    from kiln.errors import ConfigError

    with pytest.raises(ConfigError, match="whiten_bias_schedule.*whiten_bias_epochs, which is not set"):
        load_config(overrides=["train.model=fastnet", "train.whiten_bias_schedule=shift_lr_to_zero"])
    config = load_config(overrides=["train.model=fastnet", "train.whiten_bias_epochs=3",
                                    "train.whiten_bias_schedule=shift_lr_to_zero"])  # fmt: skip
    assert config.train.whiten_bias_schedule == "shift_lr_to_zero"


def test_whiten_bias_epochs_is_refused_for_models_without_a_whitening_layer():
    from kiln.config import load_config
    from kiln.errors import ConfigError

    with pytest.raises(ConfigError, match="whiten_bias_epochs.*whitening layer of the fastnet"):
        load_config(overrides=["train.model=resnet9", "train.whiten_bias_epochs=3"])


def test_cudnn_autotuning_is_on_inside_fit_on_cuda_only_and_restored_after():
    from kiln.training import cudnn_autotuned

    before = torch.backends.cudnn.benchmark
    with cudnn_autotuned(torch.device("cpu")):
        assert torch.backends.cudnn.benchmark == before
    torch.backends.cudnn.benchmark = False
    try:
        with cudnn_autotuned(torch.device("cuda")):  # only sets a flag: runs without a GPU
            assert torch.backends.cudnn.benchmark
        assert not torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = before


def test_the_onecycle_schedule_starts_and_ends_at_the_fractions_asked_for():
    from kiln.training import make_scheduler

    config = TrainConfig(lr=2.0, warmup_fraction=0.25, initial_lr_fraction=0.2, final_lr_fraction=0.07)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    scheduler = make_scheduler(optimizer, config, total_steps=20)
    rates = [scheduler.get_last_lr()[0]]
    for _ in range(20):
        optimizer.step()
        scheduler.step()
        rates.append(scheduler.get_last_lr()[0])
    assert rates[0] == pytest.approx(0.4) and rates[5] == pytest.approx(2.0) and rates[20] == pytest.approx(0.14)
    assert rates[:6] == sorted(rates[:6]) and rates[5:] == sorted(rates[5:], reverse=True)


def test_lookahead_pulls_toward_the_slow_copy_on_airbench_schedule_and_ends_on_it():
    from kiln.training import Lookahead

    layer = torch.nn.Linear(2, 2)
    start = layer.weight.detach().clone()
    lookahead = Lookahead(layer, interval=2, total_steps=4)
    with torch.no_grad():
        layer.weight.add_(1.0)
    lookahead.step()  # step 1: not a pull
    assert torch.equal(layer.weight, start + 1.0)
    lookahead.step()  # step 2 of 4: decay 0.95^2 * (2/4)^3
    decay = 0.95**2 * 0.5**3
    assert torch.allclose(layer.weight, start + (1 - decay))
    slow = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(5.0)
    lookahead.finish()  # training ends on the slow copy, not the fast weights' last steps
    assert torch.equal(layer.weight, slow)


def test_identity_init_is_refused_for_models_without_it():
    from kiln.config import load_config
    from kiln.errors import ConfigError

    with pytest.raises(ConfigError, match="identity_init.*fastnet"):
        load_config(overrides=["train.model=resnet9", "train.identity_init=true"])


def test_muon_trains_the_filters_in_their_own_orthogonalized_group_and_every_other_weight_by_sgd():
    from kiln.training import make_optimizer, make_scheduler

    config = TrainConfig(model="fastnet", optimizer="muon", lr=0.5, weight_decay=5e-4, bias_lr_scale=64,
                         momentum=0.85, muon_lr=0.3, muon_momentum=0.6, schedule="onecycle")  # fmt: skip
    model = build_model(ModelSpec("fastnet", (8, 8, 3), 4))
    optimizer = make_optimizer(model, config)
    weights, shifts, filters = optimizer.param_groups
    assert weights["params"] == [model.head.weight] and not weights["orthogonalize"]
    assert (weights["lr"], weights["momentum"], weights["weight_decay"]) == (0.5, 0.85, 5e-4)
    assert (shifts["lr"], shifts["weight_decay"]) == (0.5 * 64, 0.0)
    convolutions = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m is not model.whiten]
    assert filters["params"] == convolutions  # the frozen whitening filters left out, as with sgd
    assert filters["orthogonalize"]
    assert (filters["lr"], filters["momentum"], filters["weight_decay"]) == (0.3, 0.6, 0.0)
    scheduler = make_scheduler(optimizer, config, total_steps=10)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    weights_lr, _, filters_lr = scheduler.get_last_lr()
    assert filters_lr / weights_lr == pytest.approx(0.3 / 0.5)  # one schedule scales every group


def test_muon_leaves_the_filters_of_a_model_without_normalization_to_sgd(caplog):
    """A distillation student of a plain CNN family can meet a muon recipe (the teacher's): its filters then train
    by SGD, since holding their norm fixed would change what it computes."""
    from kiln.training import make_optimizer

    config = TrainConfig(model="fastnet", optimizer="muon")
    student = build_model(ModelSpec("simple_cnn", (8, 8, 3), 4))
    with caplog.at_level("INFO", logger="kiln"):
        groups = make_optimizer(student, config).param_groups
    assert groups[-1]["params"] == [] and "filters train by SGD" in caplog.text
    assert sum(len(group["params"]) for group in groups) == len(list(student.parameters()))


def test_muon_is_refused_for_models_that_do_not_normalize_after_every_convolution():
    from kiln.config import load_config
    from kiln.errors import ConfigError

    with pytest.raises(ConfigError, match="optimizer.*muon.*not simple_cnn.*train.optimizer=sgd"):
        load_config(overrides=["train.model=simple_cnn", "train.optimizer=muon"])
    assert load_config(overrides=["train.model=resnet9", "train.optimizer=muon"]).train.optimizer == "muon"
