"""The training loop, apart from the stage that wires it: runtime choice, data, optimizer recipe, epochs, resume.

Device and precision are decided once (`resolve_runtime`) and passed down; normalization happens on the device,
after augmentation of uint8 images, so the loader moves bytes, not floats. Batches come from the device data path
(the training split resident on the GPU, augmented there: kiln/device_data.py) or from a DataLoader with
per-image transforms (`train.data_path`). On CUDA: channels_last, bf16 autocast, fused optimizer steps, and
torch.compile for long runs; each of these degrades to its CPU equivalent without failing.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kiln import step_graph
from kiln.config import NORMALIZED_CONV_MODELS, TrainConfig
from kiln.errors import ConfigError
from kiln.hard_examples import ONE_PROCESS_ONLY, build_selector
from kiln.muon import Muon
from kiln.runtime.preprocess import Preprocessing

LOGGER = logging.getLogger("kiln")

EpochCallback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Distributed:
    """This process's place in a data-parallel (DDP) run: each rank trains on its share of every global batch,
    gradients are averaged across ranks, and only rank 0 writes checkpoints and outputs (kiln/distributed.py)."""

    rank: int
    world_size: int

    @property
    def is_writer(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class Runtime:
    """Where and how numbers are computed; `notes` says what was changed from the request and why."""

    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    notes: tuple[str, ...] = ()

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self, cache: bool = True):
        """`cache=False` casts a weight afresh at every use, as a step captured as a CUDA graph needs."""
        dtype = self.autocast_dtype
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None, cache_enabled=cache)


def resolve_runtime(device: str, precision: str) -> Runtime:
    """Pick the device and precision; GPU-only requests degrade to the CPU equivalent with a note."""
    notes = []
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        notes.append("train.device=cuda but no CUDA device is visible: training on the CPU")
    chosen = torch.device("cuda" if (device in ("auto", "cuda") and cuda) else "cpu")
    if precision == "auto":
        precision = "bf16" if chosen.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    elif precision == "fp16" and chosen.type == "cpu":
        notes.append("fp16 autocast is for CUDA: training in fp32 on the CPU")
        precision = "fp32"
    return Runtime(chosen, precision, tuple(notes))


class AugmentedImages(Dataset):
    """uint8 NHWC images -> (augmented uint8 CHW tensor, label). Picklable, for DataLoader workers.

    `policy` is the augment stage's spec the transform was built from; given, it lets the device data path run the
    same augmentation batched on the GPU (kiln/device_data.py)."""

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, transform: Callable | None, policy: dict[str, Any] | None = None
    ):
        self.images, self.labels, self.transform, self.policy = images, labels, transform, policy
        if transform is None and policy is None:
            self.policy = {"ops": []}  # no augmentation at all: the device path can serve it

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = torch.from_numpy(np.ascontiguousarray(self.images[index])).permute(2, 0, 1)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


class DeviceNormalizer(nn.Module):
    """uint8 NCHW on the device -> normalized float, as Preprocessing specifies."""

    def __init__(self, prep: Preprocessing, device: torch.device):
        super().__init__()
        shape = (1, prep.channels, 1, 1)
        self.mean = torch.tensor(prep.mean, device=device).view(shape)
        self.std = torch.tensor(prep.std, device=device).view(shape)

    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return (images_uint8.float() / 255.0 - self.mean) / self.std


def optimizer_for_run(model: nn.Module, config: TrainConfig, runtime: Runtime, total_steps: int
                      ) -> torch.optim.Optimizer:  # fmt: skip
    """make_optimizer as a training run of `total_steps` on `runtime` wants it: fused on CUDA, and with muon the
    orthogonalization compiled where the model is (compile_wanted), on CUDA only: on a CPU it is a small share of
    the step, and its eager float32 form keeps seeded runs exactly reproducible."""
    cuda = runtime.device.type == "cuda"
    compile_orthogonalization = cuda and compile_wanted(config, runtime, total_steps)
    return make_optimizer(model, config, fused=cuda, compile_orthogonalization=compile_orthogonalization)


def make_optimizer(model: nn.Module, config: TrainConfig, fused: bool = False, compile_orthogonalization: bool = False
                   ) -> torch.optim.Optimizer:  # fmt: skip
    """SGD (Nesterov), AdamW or Muon (kiln/muon.py); `fused` (CUDA) runs each step as one kernel over all parameters
    (Muon: its SGD part); `compile_orthogonalization` runs Muon's Newton-Schulz iteration through torch.compile.

    Parameter groups: the weights (decayed); norm shifts and biases at bias_lr_scale times the lr (decayed only with
    decay_biases); with whiten_bias_epochs, a fastnet's whitening bias on its own (group name WHITENING_BIAS_GROUP),
    at the base lr, or the shifts' with whiten_bias_schedule=shift_lr_to_zero, which make_scheduler stops after
    those epochs; with muon, the convolution filters last, at muon_lr and muon_momentum, orthogonalized and held at
    a fixed norm instead of decayed. Frozen parameters (FastNet's whitening filters, set from the data) are left
    out."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    whitening_bias = _scheduled_whitening_bias(model, config)
    filters = _muon_filters(model, trainable) if config.optimizer == "muon" else []
    decay = [p for p in trainable if p.ndim > 1 and not any(p is f for f in filters)]
    biases = [p for p in trainable if p.ndim <= 1 and p is not whitening_bias]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": biases, "weight_decay": _bias_decay(config, config.bias_lr_scale),
         "lr": config.lr * config.bias_lr_scale},
    ]  # fmt: skip
    if whitening_bias is not None:
        scale = config.bias_lr_scale if config.whiten_bias_schedule == "shift_lr_to_zero" else 1.0
        groups.append({"params": [whitening_bias], "name": WHITENING_BIAS_GROUP, "lr": config.lr * scale,
                       "weight_decay": _bias_decay(config, scale)})  # fmt: skip
    if config.optimizer == "muon":
        groups.append({"params": filters, "lr": config.muon_lr, "momentum": config.muon_momentum,
                       "weight_decay": 0.0, "orthogonalize": True})  # fmt: skip
        return Muon(groups, lr=config.lr, momentum=config.momentum, fused=fused,
                    compile_orthogonalization=compile_orthogonalization)
    options = {"fused": True} if fused else {}
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0, **options)
    return torch.optim.AdamW(groups, lr=config.lr, **options)


WHITENING_BIAS_GROUP = "whitening_bias"


def _bias_decay(config: TrainConfig, lr_scale: float) -> float:
    """The coupled decay coefficient of a bias group trained at lr x `lr_scale`. Without decay_biases, none:
    decaying norm shifts only fights the normalization. With it, airbench's choice: the same shrinkage per step
    (lr x coefficient) as the weights, whatever the group's lr."""
    return config.weight_decay / lr_scale if config.decay_biases else 0.0


def _muon_filters(model: nn.Module, trainable: list[nn.Parameter]) -> list[nn.Parameter]:
    """The convolution filters Muon may train: all of them in a family that normalizes after every convolution
    (the config allows muon only for those); none in another, e.g. a distillation student of a plain CNN family
    under a muon recipe, whose filters then train by SGD like its other weights."""
    from kiln.models import family_of

    family = family_of(model)
    if family not in NORMALIZED_CONV_MODELS:
        LOGGER.info(f"muon: {family or type(model).__name__} does not normalize after every convolution; its "
                    "filters train by SGD")  # fmt: skip
        return []
    return [p for p in trainable if p.ndim == 4]


def _scheduled_whitening_bias(model: nn.Module, config: TrainConfig) -> nn.Parameter | None:
    # A model without the method (a distillation student of another family) has no whitening bias to schedule.
    if config.whiten_bias_epochs is None or not hasattr(model, "whitening_bias"):
        return None
    bias = model.whitening_bias()
    return bias if bias.requires_grad else None


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    """Per-step learning-rate factors. `onecycle` is a linear warm-up from `initial_lr_fraction` of lr to lr over
    `warmup_fraction` of the steps, then a linear decay to `final_lr_fraction` of lr; written out rather than torch's
    OneCycleLR, which divides by zero when the warm-up rounds to a single step (a few batches of a small dataset) and
    also cycles the momentum. The whitening bias's group (make_optimizer) follows the same factors for
    whiten_bias_epochs, then 0 (with whiten_bias_schedule=shift_lr_to_zero: 1 falling linearly to 0 over those
    epochs, whatever the run's schedule): a zero lr leaves a parameter exactly where it is, and, unlike switching
    off its gradient, does not make torch.compile trace the model again."""
    if config.schedule == "onecycle":
        warmup = max(1, round(config.warmup_fraction * total_steps))
        ends = (config.initial_lr_fraction, config.final_lr_fraction)
        factors = partial(_warmup_then_linear, warmup, total_steps, *ends)
    elif config.schedule == "constant":
        factors = _constant
    else:
        factors = partial(_warmup_then_cosine, max(1, total_steps // 20), total_steps)
    per_group = []
    for group in optimizer.param_groups:
        if group.get("name") == WHITENING_BIAS_GROUP:
            stop = config.whiten_bias_epochs * (total_steps // config.epochs)
            own = partial(_linear_to_zero, stop) if config.whiten_bias_schedule == "shift_lr_to_zero" else factors
            per_group.append(partial(_until, stop, own))
        else:
            per_group.append(factors)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, per_group)


def _until(stop: int, factors: Callable[[int], float], step: int) -> float:
    return factors(step) if step < stop else 0.0


def _linear_to_zero(stop: int, step: int) -> float:
    return 1 - step / stop  # _until calls it only for steps below stop, so stop >= 1 here


def _constant(step: int) -> float:
    return 1.0


def _warmup_then_linear(warmup: int, total_steps: int, initial: float, final: float, step: int) -> float:
    if step < warmup:
        return initial + (1 - initial) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return 1 - (1 - final) * progress


def _warmup_then_cosine(warmup: int, total_steps: int, step: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


@torch.no_grad()
def predict_probabilities(
    model: nn.Module, images: np.ndarray, prep: Preprocessing, runtime: Runtime, batch_size: int = 512,
    tta: str = "none",
) -> np.ndarray:  # fmt: skip
    """Softmax probabilities [N, classes] (float32, CPU) for uint8 NHWC images.

    `tta`: "flip" averages the probabilities of each image and its mirror; "flip_translate" also of both shifted
    by one pixel up-left and down-right (reflect-padded): six views. "flip_translate_weighted" is airbench's: the
    image and its mirror weigh 1/4 each, the image's two shifts and their mirrors 1/8 each, and the views' log-
    probabilities are averaged (a geometric mean, renormalized), not their probabilities.
    """
    model.eval().to(runtime.device)
    normalizer = DeviceNormalizer(prep, runtime.device)
    weighted = tta == "flip_translate_weighted"
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).permute(0, 3, 1, 2)
        total = None
        for view, weight in _test_time_views(batch.to(runtime.device), tta):
            with runtime.autocast():
                logits = model(normalizer(view)).float()
            scores = weight * (torch.log_softmax(logits, dim=1) if weighted else torch.softmax(logits, dim=1))
            total = scores if total is None else total + scores
        outputs.append((torch.softmax(total, dim=1) if weighted else total).cpu())
    return torch.cat(outputs).numpy()


def _test_time_views(batch: torch.Tensor, tta: str) -> list[tuple[torch.Tensor, float]]:
    """(view, weight) pairs for `predict_probabilities`; the weights sum to 1."""
    from kiln.device_data import _reflect_pad

    height, width = batch.shape[2:]

    def shifted(view: torch.Tensor) -> list[torch.Tensor]:
        padded = _reflect_pad(view, 1)
        return [padded[:, :, :height, :width], padded[:, :, 2 : height + 2, 2 : width + 2]]

    if tta == "flip_translate_weighted":  # the mirrors of the shifted images: shifted along the other diagonal
        shifts = shifted(batch)
        return [(batch, 0.25), (batch.flip(3), 0.25)] + [(view, 0.125) for view in shifts + [s.flip(3) for s in shifts]]
    views = [batch]
    if tta in ("flip", "flip_translate"):
        views.append(batch.flip(3))
    if tta == "flip_translate":
        views += [view for unshifted in list(views) for view in shifted(unshifted)]
    return [(view, 1 / len(views)) for view in views]


class Objective:
    """What fit minimises: cross-entropy with the labels. A subclass adds terms (distillation's soft targets,
    kiln/compression/distillation.py) and per-epoch figures, and gets all of fit with them: the data paths,
    precision, compile, EMA, DDP and checkpoint/resume. `capturable`: its loss keeps no figures on the host, so a
    step with it can be captured as a CUDA graph (train.cuda_graph)."""

    capturable = True

    def __init__(self, label_smoothing: float = 0.0):
        self.cross_entropy = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def loss(self, inputs: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The batch's loss from the model's float32 `logits` for the normalized `inputs`."""
        return self.cross_entropy(logits, labels)

    def epoch_metrics(self) -> dict[str, Any]:
        """Extra figures for the epoch's history row (this process's share under DDP); called once per epoch."""
        return {}


# compile=auto: below this many steps, compiling costs more than it saves. On an H200 (benchmarks/RESULTS.md) it took
# ~12 s for fastnet and saved 0.7 ms a step (break-even ~16,000 steps); ResNet-9 saves ~3.7 ms a step (issue #7).
# Whether it saves anything depends on the steps being captured (train.cuda_graph): in the eleventh session
# cifar10-fast's compiled epochs took 0.17-0.19 s captured, 0.30 s not captured, against 0.22 s eager.
COMPILE_MIN_STEPS = 10_000
PREPARE_SAMPLES = 5000  # training images a model's data-dependent initialisation (prepare) looks at


def fit(
    model: nn.Module,
    train_set: AugmentedImages,
    validation_set: tuple[np.ndarray, np.ndarray] | None,
    prep: Preprocessing,
    config: TrainConfig,
    runtime: Runtime,
    checkpoint_path: Path,
    on_epoch: EpochCallback | None = None,
    distributed: Distributed | None = None,
    objective: Objective | None = None,
    initialise: bool = True,
) -> list[dict[str, Any]]:
    """Train for config.epochs, checkpointing after every epoch (or every `checkpoint_interval_s` seconds, and
    after the last) and resuming from `checkpoint_path` if present.

    With `distributed` (a torch.distributed process group already initialised), every rank runs this with the same
    arguments: each takes its 1/world share of every global batch of config.batch_size, metrics are summed across
    ranks, and only rank 0 writes the checkpoint, scores the validation set and calls `on_epoch`.

    `validation_set` (held out from the training split, never the test split) is scored after every epoch.
    With train.keep_hardest, each step trains on the share of its batch that a small proxy network, learning
    alongside, ranks hardest (kiln/hard_examples.py). With train.ema_decay set, `model` ends holding the averaged
    weights. Returns the per-epoch history (train loss/accuracy, validation accuracy, lr, throughput, data path).
    `initialise=False` skips a fresh model's data-dependent set-up (`prepare`): for continuing to train a trained
    model, e.g. fine-tuning after pruning.

    On CUDA, cuDNN times its convolution algorithms on the first batch and keeps the fastest (every training batch
    has the same shape: full batches only); the setting is restored afterwards.
    """
    torch.manual_seed(config.seed)
    model.to(runtime.device)
    channels_last = runtime.device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(config.seed)
    batches = training_batches(train_set, prep, config, runtime, channels_last, distributed)
    total_steps = config.epochs * len(batches)
    optimizer = optimizer_for_run(model, config, runtime, total_steps)
    scheduler = make_scheduler(optimizer, config, total_steps)
    scaler = torch.amp.GradScaler("cuda", enabled=runtime.precision == "fp16")
    objective = objective or Objective(config.label_smoothing)
    resuming = checkpoint_path.exists()
    if initialise and not resuming:
        if config.identity_init and hasattr(model, "identity_init"):  # (a distillation student may lack it)
            model.identity_init()
        if hasattr(model, "prepare"):  # data-dependent init (FastNet's whitening)
            model.prepare(_normalized_sample(train_set, prep, runtime.device, config.seed))
    average = _weight_average(model, config)
    lookahead = _lookahead(model, config, total_steps)
    selector = _hard_example_selector(train_set, prep, config, runtime, total_steps, channels_last, distributed)
    history: list[dict[str, Any]] = []
    start_epoch = 1
    if resuming:
        # On the CPU: the random-number states must stay CPU tensors; load_state_dict copies the rest to the device.
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        if average is not None:
            average.load_state_dict(state["average"])
        if lookahead is not None:
            lookahead.load_state_dict(state["lookahead"])
        if selector is not None:
            selector.load_state_dict(state["selector"])
        history = list(state["history"])
        start_epoch = int(state["epoch"]) + 1
        torch.set_rng_state(state["torch_rng"])  # augmentation draws continue as if never interrupted
        LOGGER.info(f"resuming from the checkpoint after epoch {start_epoch - 1} of {config.epochs}")
    with cudnn_autotuned(runtime.device):
        model_step = compiled(_data_parallel(model, runtime, distributed), config, runtime, total_steps)
        totals = StepTotals(runtime.device)
        train_step = _graphed_if_asked(TrainStep(model_step, objective, optimizer, scaler, runtime, totals, selector),
                                       config, distributed)  # fmt: skip
        writer = distributed is None or distributed.is_writer
        evaluated = average.module if average is not None else model
        last_saved = time.perf_counter()
        for epoch in range(start_epoch, config.epochs + 1):
            model.train()
            _synchronize(runtime)
            started = time.perf_counter()
            totals.reset()
            seen = 0
            for inputs, labels in batches.epoch(generator, epoch):
                seen += train_step(inputs, labels)
                scheduler.step()
                if lookahead is not None:
                    lookahead.step()
                if average is not None:
                    average.update_parameters(model)
            if lookahead is not None and epoch == config.epochs:
                lookahead.finish()  # before the last epoch is scored and saved: those are the weights fit returns
            _synchronize(runtime)
            seconds = time.perf_counter() - started
            loss_sum, correct = totals.loss_sum, totals.correct
            if distributed is not None:
                loss_sum, correct, seen = _sum_across_ranks(loss_sum, correct, seen, runtime)
            row = {
                "epoch": epoch,
                "train_loss": round(float(loss_sum) / max(seen, 1), 5),
                "train_accuracy": round(int(correct) / max(seen, 1), 5),
                "val_accuracy": _accuracy(evaluated, validation_set, prep, runtime) if writer else None,
                "lr": round(float(scheduler.get_last_lr()[0]), 6),
                "seconds": round(seconds, 3),
                "images_per_s": round(seen / max(seconds, 1e-9), 1),
                "data_path": batches.name,
                **objective.epoch_metrics(),
            }
            history.append(row)
            if writer:
                if epoch == config.epochs or time.perf_counter() - last_saved >= config.checkpoint_interval_s:
                    _save_checkpoint(checkpoint_path, model, optimizer, scheduler, generator, epoch, history,
                                     average, lookahead, selector)  # fmt: skip
                    last_saved = time.perf_counter()
                if on_epoch is not None:
                    on_epoch(row)
    if average is not None:
        model.load_state_dict(average.module.state_dict())
    return history


class StepTotals:
    """An epoch's summed train loss and count of correct predictions, kept on the device (a float() per step would
    wait for the GPU every step) and added to in place, so that a captured step adds to the same tensors."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.correct.zero_()

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss_sum.add_(loss.detach(), alpha=len(labels))
        self.correct.add_((logits.argmax(dim=1) == labels).sum())


class TrainStep:
    """One training step on a batch: forward, the objective's loss, backward, the optimizer's step, and the
    epoch's totals; returns the number of images it trained on. Run eagerly, or captured once and replayed
    (kiln/step_graph.py) where none of this reads a device value on the host (not so with the selector or fp16's
    GradScaler)."""

    def __init__(self, model_step: Callable, objective: Objective, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, runtime: Runtime, totals: StepTotals, selector: Any = None,
                 autocast_cache: bool = True):  # fmt: skip
        self.model_step, self.objective, self.optimizer, self.scaler = model_step, objective, optimizer, scaler
        self.runtime, self.totals, self.selector, self.autocast_cache = runtime, totals, selector, autocast_cache

    def __call__(self, inputs: torch.Tensor, labels: torch.Tensor) -> int:
        share = 1.0
        if self.selector is not None:
            offered = len(labels)
            inputs, labels = self.selector.select(inputs, labels)
            share = len(labels) / offered  # the kept examples' loss at full-batch scale (hard_examples.py)
        with self.runtime.autocast(cache=self.autocast_cache):
            logits = self.model_step(inputs)
            loss = self.objective.loss(inputs, logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss if self.selector is None else loss * share).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.totals.add(loss, logits, labels)
        return len(labels)


def _graphed_if_asked(step: TrainStep, config: TrainConfig, distributed: Distributed | None
                      ) -> Callable[[torch.Tensor, torch.Tensor], int]:  # fmt: skip
    """`step`, or with train.cuda_graph its captured form (kiln/step_graph.py); eager, with a log line saying why,
    where this run's steps cannot be captured."""
    if not config.cuda_graph:
        return step
    device = step.runtime.device
    backend = step_graph.backend_for(device)
    reason = "CUDA graphs need a CUDA device" if backend is None else step_graph.unavailable_reason(
        step.optimizer, step.runtime.precision, distributed=distributed is not None, selector=step.selector is not None,
        capturable_objective=step.objective.capturable, compiled_graphs=config.compile_mode == "reduce-overhead",
    )  # fmt: skip
    if reason is not None:
        LOGGER.info(f"train.cuda_graph: {reason}; the steps run eagerly")
        return step
    step.autocast_cache = False  # a replay must not reuse weights cast while capturing
    return step_graph.GraphedSteps(step, step.optimizer, device, backend)


@contextlib.contextmanager
def cudnn_autotuned(device: torch.device) -> Iterator[None]:
    """torch.backends.cudnn.benchmark on, for CUDA work whose input shapes repeat; the previous value after."""
    if device.type != "cuda":
        yield
        return
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


class _LoaderBatches:
    """The DataLoader path: per-image torchvision v2 transforms on the CPU, normalized on the device."""

    name = "loader"

    def __init__(self, train_set: AugmentedImages, prep: Preprocessing, config: TrainConfig, runtime: Runtime,
                 channels_last: bool, shard: tuple[int, int] = (0, 1)):  # fmt: skip
        self.train_set, self.config, self.runtime, self.channels_last = train_set, config, runtime, channels_last
        self.shard = shard
        self.normalizer = DeviceNormalizer(prep, runtime.device)
        self.drop_last = len(train_set) > config.batch_size
        self.loader: DataLoader | None = None

    def __len__(self) -> int:
        count, size = len(self.train_set), self.config.batch_size
        return count // size if self.drop_last else -(-count // size)

    def _sampler(self, generator: torch.Generator):
        if self.shard[1] == 1:
            return None
        from torch.utils.data.distributed import DistributedSampler

        rank, world = self.shard
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        return DistributedSampler(self.train_set, world, rank, shuffle=True, seed=seed, drop_last=self.drop_last)

    def epoch(self, generator: torch.Generator, number: int):
        if self.loader is None:  # built once: its workers persist across epochs and its sampler draws from generator
            sampler = self._sampler(generator)
            self.loader = DataLoader(
                self.train_set,
                batch_size=self.config.batch_size // self.shard[1],
                shuffle=sampler is None,
                sampler=sampler,
                drop_last=self.drop_last,
                num_workers=self.config.num_workers,
                pin_memory=self.runtime.device.type == "cuda",
                persistent_workers=self.config.num_workers > 0,
                generator=generator,
            )
        if self.loader.sampler is not None and hasattr(self.loader.sampler, "set_epoch"):
            self.loader.sampler.set_epoch(number)
        for images, labels in self.loader:
            inputs = self.normalizer(images.to(self.runtime.device, non_blocking=True))
            if self.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            yield inputs, labels.to(self.runtime.device, non_blocking=True)


class _DeviceBatches:
    name = "device"

    def __init__(self, batches: Any):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def epoch(self, generator: torch.Generator, number: int):
        return self.batches.epoch(generator, number)


def training_batches(train_set: AugmentedImages, prep: Preprocessing, config: TrainConfig, runtime: Runtime,
                     channels_last: bool = False, distributed: Distributed | None = None):  # fmt: skip
    """The batch source `config.data_path` asks for: the device path where it applies, else the DataLoader path
    (with a log line saying why when the device path was asked for explicitly)."""
    from kiln.device_data import DeviceBatches, alternating_flip, fits_on_device, unsupported_ops

    shard = (0, 1) if distributed is None else (distributed.rank, distributed.world_size)
    if config.batch_size % shard[1]:
        raise ConfigError(
            f"train.batch_size={config.batch_size} is the global batch and must divide evenly among "
            f"{shard[1]} data-parallel processes; use a multiple of {shard[1]}"
        )
    wanted = config.data_path
    if wanted == "auto":
        wanted = "device" if runtime.device.type == "cuda" else "loader"
    if wanted == "device":
        reason = ""
        if train_set.policy is None:
            reason = "no augmentation policy spec was given (only a transform)"
        elif unsupported_ops(train_set.policy):
            reason = f"augmentation op(s) {', '.join(unsupported_ops(train_set.policy))} run only per image"
        else:
            fits, reason = fits_on_device(train_set.images, train_set.policy, runtime.device)
        if not reason:
            return _DeviceBatches(DeviceBatches(
                train_set.images, train_set.labels, train_set.policy, prep, runtime.device, config.batch_size,
                channels_last, shard, config.seed,
            ))  # fmt: skip
        log = LOGGER.warning if config.data_path == "device" else LOGGER.info
        log(f"device data path not used: {reason}; using the DataLoader path")
    if train_set.policy is not None and alternating_flip(train_set.policy):
        LOGGER.info("augment.flip=alternate runs on the device data path; the DataLoader path flips at random")
    return _LoaderBatches(train_set, prep, config, runtime, channels_last, shard)


def compile_wanted(config: TrainConfig, runtime: Runtime, total_steps: int) -> bool:
    """train.compile for a run of `total_steps` on `runtime`: auto is on for CUDA runs long enough to repay it."""
    if config.compile == "auto":
        return runtime.device.type == "cuda" and total_steps >= COMPILE_MIN_STEPS
    return config.compile == "on"


def compiled(model: nn.Module, config: TrainConfig, runtime: Runtime, total_steps: int) -> Callable:
    """The callable training steps run: the model itself, or its torch.compile'd form."""
    if not compile_wanted(config, runtime, total_steps):
        return model
    try:
        # Static shapes: a fit's batches all have one shape (full batches; the hard-example selector keeps a fixed
        # count), and its proxy shares FastNet.forward with the main model, so with automatic dynamic shapes the
        # second batch size that code sees would make both graphs symbolic in the batch. Each further shape (or
        # model, dtype, grad mode) in one process compiles a graph of its own, up to dynamo's recompile limit (8
        # per function), after which that function runs eagerly.
        mode = None if config.compile_mode == "default" else config.compile_mode
        return torch.compile(model, mode=mode, dynamic=False)
    except Exception as error:  # e.g. no C compiler for the CPU backend: train uncompiled rather than fail
        LOGGER.warning(f"torch.compile is unavailable ({error.__class__.__name__}: {error}); training uncompiled")
        return model


def _data_parallel(model: nn.Module, runtime: Runtime, distributed: Distributed | None) -> nn.Module:
    if distributed is None:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def _sum_across_ranks(loss_sum: torch.Tensor, correct: torch.Tensor, seen: int, runtime: Runtime):
    import torch.distributed as dist

    totals = torch.stack([loss_sum.double(), correct.double(), torch.tensor(float(seen), device=runtime.device)])
    dist.all_reduce(totals)
    return totals[0], totals[1].long(), int(totals[2])


class Lookahead:
    """Lookahead (Zhang et al. 2019) with airbench's schedule: every `interval` steps the slow copy of the weights
    (and BatchNorm statistics) moves toward the fast ones, slow += (1 - decay) (fast - slow), and training restarts
    from it. decay = 0.95^interval * (step / total)^3: the slow copy simply follows early on and damps the noise
    of the high-lr steps late in the run. Training ends on the slow copy."""

    def __init__(self, model: nn.Module, interval: int, total_steps: int):
        self.interval, self.total_steps, self.steps = interval, max(1, total_steps), 0
        # state_dict's tensors share storage with the model's, so writing them writes the model.
        self.fast = [tensor for tensor in model.state_dict().values() if tensor.is_floating_point()]
        self.slow = [tensor.clone() for tensor in self.fast]

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        if self.steps % self.interval == 0:
            decay = 0.95**self.interval * (self.steps / self.total_steps) ** 3
            self._pull(1 - decay)

    @torch.no_grad()
    def finish(self) -> None:
        self._pull(0.0)

    def _pull(self, weight: float) -> None:
        torch._foreach_lerp_(self.slow, self.fast, weight)
        torch._foreach_copy_(self.fast, self.slow)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "slow": [tensor.cpu() for tensor in self.slow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        for tensor, saved in zip(self.slow, state["slow"]):
            tensor.copy_(saved)


LOOKAHEAD_MIN_PULLS = 10  # in a shorter run the slow copy would mostly hold the weights back at their start


def _lookahead(model: nn.Module, config: TrainConfig, total_steps: int) -> Lookahead | None:
    if config.lookahead_steps is None:
        return None
    if total_steps < LOOKAHEAD_MIN_PULLS * config.lookahead_steps:
        LOGGER.info(f"lookahead off: {total_steps} steps make fewer than {LOOKAHEAD_MIN_PULLS} pulls of every "
                    f"{config.lookahead_steps} steps")  # fmt: skip
        return None
    return Lookahead(model, config.lookahead_steps, total_steps)


def _hard_example_selector(train_set: AugmentedImages, prep: Preprocessing, config: TrainConfig, runtime: Runtime,
                           total_steps: int, channels_last: bool, distributed: Distributed | None):  # fmt: skip
    """With train.keep_hardest, the proxy that picks each batch's examples (kiln/hard_examples.py); else None."""
    if config.keep_hardest is None:
        return None
    if distributed is not None:  # launch_training refuses this first; a direct caller gets the same answer
        raise ConfigError(ONE_PROCESS_ONLY)
    sample = _normalized_sample(train_set, prep, runtime.device, config.seed)
    return build_selector(sample, int(train_set.labels.max()) + 1, config, runtime, total_steps, channels_last)


def _weight_average(model: nn.Module, config: TrainConfig):
    if config.ema_decay is None:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    # use_buffers: BatchNorm statistics are averaged too, so the averaged model is usable as is.
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)


def _normalized_sample(train_set: AugmentedImages, prep: Preprocessing, device: torch.device, seed: int) -> torch.Tensor:
    count = len(train_set.labels)
    chosen = np.sort(np.random.default_rng(seed).permutation(count)[:PREPARE_SAMPLES])
    images = torch.from_numpy(np.ascontiguousarray(train_set.images[chosen])).permute(0, 3, 1, 2).to(device)
    return DeviceNormalizer(prep, device)(images)


def _synchronize(runtime: Runtime) -> None:
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)  # timings must cover the GPU's work, not just its queueing


@dataclass
class TrainingResult:
    model: nn.Module  # trained, on the CPU, fp32
    spec: Any  # kiln.models.ModelSpec
    prep: Preprocessing
    history: list[dict[str, Any]]
    runtime: Runtime
    train_samples: int
    validation_samples: int


def write_training_output(result: TrainingResult, config: TrainConfig, out_dir: Path, processes: int = 1) -> dict[str, Any]:
    """The train stage's files (weights.pt, model.json, preprocess.json, history.csv); returns its metrics."""
    import pandas as pd

    from kiln.models import save_model
    from kiln.store import write_json

    save_model(result.model, result.spec, out_dir)
    write_json(out_dir / "preprocess.json", result.prep.to_json())
    pd.DataFrame(result.history).to_csv(out_dir / "history.csv", index=False)
    last = result.history[-1]
    return {
        "model": config.model,
        "parameters": sum(parameter.numel() for parameter in result.model.parameters()),
        "device": str(result.runtime.device),
        "precision": result.runtime.precision,
        "processes": processes,
        "epochs": len(result.history),
        "final_train_loss": last["train_loss"],
        "final_train_accuracy": last["train_accuracy"],
        "final_val_accuracy": last["val_accuracy"],
        "train_samples": int(result.train_samples),
        "validation_samples": int(result.validation_samples),
        "train_seconds": round(sum(row["seconds"] for row in result.history), 2),
        "data_path": last["data_path"],
        "seed": config.seed,  # with the policy's and data's digests, what a CPU run needs to repeat exactly
        "notes": list(result.runtime.notes),
    }


def run_training(
    data_dir: Path,
    policy_spec: dict[str, Any],
    config: TrainConfig,
    checkpoint_path: Path,
    on_epoch: EpochCallback | None = None,
    distributed: Distributed | None = None,
    runtime: Runtime | None = None,
) -> TrainingResult:
    """What the train stage does between reading its inputs and writing its output: build the model, hold out the
    validation share, and fit (in this process, or as one rank of a data-parallel run)."""
    from kiln.augmentation import build_transform
    from kiln.dataset import read_info, read_split, stratified_indices
    from kiln.models import ModelSpec, build_model

    info = read_info(data_dir)
    height, width, channels = info.image_shape
    prep = Preprocessing(height, width, channels, tuple(info.channel_mean), tuple(info.channel_std))
    spec = ModelSpec(config.model, info.image_shape, info.num_classes)
    runtime = runtime or resolve_runtime(config.device, config.precision)
    torch.manual_seed(config.seed)
    model = build_model(spec)
    train_images, train_labels = read_split(data_dir, "train")
    validation = None
    if config.validation_fraction > 0:
        fit_indices, held_out = stratified_indices(train_labels, config.validation_fraction, config.seed)
        validation = (train_images[held_out], train_labels[held_out])
        train_images, train_labels = train_images[fit_indices], train_labels[fit_indices]
    train_set = AugmentedImages(train_images, train_labels, build_transform(policy_spec), policy_spec)
    history = fit(model, train_set, validation, prep, config, runtime, checkpoint_path, on_epoch, distributed)
    return TrainingResult(model.float().cpu(), spec, prep, history, runtime, len(train_labels),
                          0 if validation is None else len(validation[1]))  # fmt: skip


def _accuracy(model, labelled: tuple[np.ndarray, np.ndarray] | None, prep, runtime: Runtime) -> float | None:
    if labelled is None or len(labelled[1]) == 0:
        return None
    images, labels = labelled
    return round(float((predict_probabilities(model, images, prep, runtime).argmax(axis=1) == labels).mean()), 5)


def _save_checkpoint(path: Path, model, optimizer, scheduler, generator, epoch: int, history, average=None,
                     lookahead=None, selector=None) -> None:  # fmt: skip
    """Write to a temp file, then os.replace: a crash mid-write leaves the previous checkpoint intact."""
    temporary = path.with_suffix(".tmp")
    torch.save(
        {
            **({"average": average.state_dict()} if average is not None else {}),
            **({"lookahead": lookahead.state_dict()} if lookahead is not None else {}),
            **({"selector": selector.state_dict()} if selector is not None else {}),
            "model": model.state_dict(),
            "optimizer": step_graph.host_learning_rates(optimizer.state_dict()),
            "scheduler": step_graph.host_learning_rates(scheduler.state_dict()),
            "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "epoch": epoch,
            "history": history,
        },
        temporary,
    )
    os.replace(temporary, path)
