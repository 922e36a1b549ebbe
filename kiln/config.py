"""Typed pipeline configuration: one pydantic section per stage, profiles as YAML, `--set` overrides.

Every default is visible here. `load_config` is the edge where user input is validated; anything wrong comes
back as one `ConfigError` naming the key, the bad value and what is accepted.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal

import fsspec.utils
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from kiln.errors import ConfigError

PROFILE_NAMES = ("quickstart", "cifar10", "cifar10-fast", "cifar10-long", "mnist", "imagefolder")
DatasetSource = Literal["digits", "cifar10", "mnist", "fashion-mnist", "imagefolder"]
ModelName = Literal["mlp", "simple_cnn", "lenet", "resnet9", "fastnet", "fastnet_wide", "fastnet_lean"]
FASTNET_MODELS = ("fastnet", "fastnet_wide", "fastnet_lean")  # the families with identity_init() and whitening
FASTNET_NAMES = f"{', '.join(FASTNET_MODELS[:-1])} and {FASTNET_MODELS[-1]}"  # for messages
# Families whose every convolution feeds a BatchNorm, so a filter's scale does not change what they compute: Muon
# (train.optimizer=muon) may hold each filter tensor at a fixed norm instead of decaying it.
NORMALIZED_CONV_MODELS = (*FASTNET_MODELS, "resnet9")


class Section(BaseModel):
    """Base for config sections: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=True)
    # Settings that change how a stage runs but never what it writes; left out of the stage's content key.
    not_in_key: ClassVar[frozenset[str]] = frozenset()

    def key_fields(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude=set(self.not_in_key))


class DataConfig(Section):
    not_in_key = frozenset({"timeout_s", "max_archive_bytes"})
    source: DatasetSource = Field("digits", description="which loader the download stage uses")
    uri: str | None = Field(
        None,
        description="imagefolder: folder, .tar.gz/.zip, http(s) URL of one, or a .csv manifest (path,label[,split]); "
        "torchvision sets: mirror base URL",
    )
    classes: list[str] | None = Field(
        None, description="CSV manifest: the allowed labels, in class-index order (None: the sorted distinct labels)",
    )
    test_fraction: float = Field(0.2, gt=0, lt=1, description="held-out share when the source has no test split")
    image_size: int | None = Field(None, ge=4, le=1024, description="resize imagefolder images to this square size")
    max_train_samples: int | None = Field(None, ge=1, description="stratified subsample, for quick runs")
    max_test_samples: int | None = Field(None, ge=1)
    max_archive_bytes: int = Field(8 * 1024**3, ge=1, description="refuse archives that unpack past this (zip bombs)")
    timeout_s: float = Field(60.0, gt=0, description="per HTTP request")
    seed: int = Field(0, description="for the stratified split and subsampling")

    @field_validator("classes")
    @classmethod
    def _distinct_class_names(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        names = [str(name).strip() for name in value]
        if len(names) < 2 or any(not name for name in names) or len(set(names)) != len(names):
            raise ValueError("must list at least two distinct, non-empty class names, e.g. [cat, dog]")
        return names


class DriftLimits(Section):
    """How far data may drift from a reference (production's data) before it counts: see kiln/drift.py."""

    max_label_js_distance: float = Field(
        0.05, ge=0, le=1, description="label distribution drift allowed (Jensen-Shannon distance, base 2)",
    )
    max_brightness_ks: float = Field(
        0.1, ge=0, le=1,
        description="per-image, per-channel brightness drift allowed (two-sample Kolmogorov-Smirnov statistic D)",
    )
    max_contrast_ks: float = Field(
        0.1, ge=0, le=1,
        description="per-image, per-channel contrast drift allowed (two-sample Kolmogorov-Smirnov statistic D)",
    )


class ValidateConfig(DriftLimits):
    min_pixel_std: float = Field(1.0, ge=0, description="an image whose pixels vary less than this is flagged as blank")
    min_peak_pixel: int = Field(
        64, ge=0, le=255, description="a split's brightest pixel must reach this (catches 0..1 or 0..16 data)"
    )
    mostly: float = Field(0.99, gt=0, le=1, description="share of rows that per-row expectations must hold for")
    min_samples_per_class: int = Field(1, ge=1, description="per split")
    max_class_ratio: float = Field(
        10.0, ge=1, description="training-set balance: the largest class may hold at most this many times the smallest",
    )
    max_duplicate_fraction: float = Field(
        0.01, ge=0, le=1, description="share of a split's images allowed to repeat another image of that split exactly",
    )
    max_leaked_fraction: float = Field(
        0.0, ge=0, le=1, description="share of test images allowed to appear in the training split too (leakage)",
    )
    on_bad_sample: Literal["fail", "quarantine"] = Field(
        "quarantine",
        description="files in class folders that could not be decoded: quarantine (leave out, list them) or fail",
    )
    on_drift: Literal["warn", "fail"] = Field(
        "warn", description="drift beyond the max_* limits against production's data: report it, or fail the run",
    )


class AugmentConfig(Section):
    policy: Literal["auto", "none", "crop", "crop_flip"] = Field(
        "auto", description="auto: crop+flip for RGB, crop for grayscale",
    )
    crop_padding: int | None = Field(
        None, ge=0, description="pixels of padding before the random crop; None: size // 8",
    )
    cutout: int = Field(
        0, ge=0, description="side in pixels of a random square filled with the mean colour (Cutout); 0: off",
    )
    cutout_inside: bool = Field(
        False, description="place Cutout's square wholly inside the image (airbench96); false: centred anywhere and "
        "clipped at the border (DeVries & Taylor), which covers less on average",
    )
    flip: Literal["random", "alternate"] = Field(
        "random", description="crop_flip's flips. alternate: each training image is mirrored in every other epoch "
        "(which epochs is random per image), so every two epochs see both orientations (airbench); on the device "
        "data path; the DataLoader path flips at random",
    )
    preview_images: int = Field(32, ge=1, le=256, description="images in the preview grid PNG")
    seed: int = Field(0, description="for the preview only; training draws from train.seed")

    @field_validator("cutout_inside")
    @classmethod
    def _inside_needs_cutout(cls, value: bool, info: ValidationInfo) -> bool:
        if value and not info.data.get("cutout"):
            raise ValueError("places Cutout's square, but augment.cutout is 0 (off): set augment.cutout to its side")
        return value

    @field_validator("flip")
    @classmethod
    def _alternating_needs_flips(cls, value: str, info: ValidationInfo) -> str:
        policy = info.data.get("policy")
        if value == "alternate" and policy in ("none", "crop"):
            raise ValueError(f"alternate needs a policy that flips, not {policy}: set augment.policy=crop_flip")
        return value


class TrainConfig(Section):
    not_in_key = frozenset({"checkpoint_interval_s"})
    model: ModelName = "simple_cnn"
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["sgd", "adamw", "muon"] = Field(
        "adamw", description="muon: the convolution filters by Muon (orthogonalized momentum updates at muon_lr, "
        "kiln/muon.py), every other parameter by SGD as with sgd; for the families that normalize after every "
        "convolution",
    )
    lr: float = Field(3e-3, gt=0, description="peak learning rate of the schedule")
    weight_decay: float = Field(5e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd, and muon's SGD part")
    muon_lr: float = Field(
        0.24, gt=0, le=10, description="muon: the filters' peak learning rate, for orthogonalized updates (each "
        "filter tensor kept at norm sqrt(output channels), so this is a relative step size); the schedule scales it "
        "as it scales lr",
    )
    muon_momentum: float = Field(0.6, ge=0, lt=1, description="muon: the filters' Nesterov momentum")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    validation_fraction: float = Field(
        0.1, ge=0, lt=1, description="stratified share of train held out to watch each epoch (never the test split)"
    )
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available, else cpu")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast on cuda, fp32 on cpu",
    )
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    data_path: Literal["auto", "device", "loader"] = Field(
        "auto",
        description="device: the training split lives on the training device and is augmented there per batch; "
        "loader: a DataLoader with per-image transforms; auto: device on CUDA when it fits in memory, else loader",
    )
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile the model; auto: on CUDA when the run is long enough to repay compiling",
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile's mode when the model is compiled: reduce-overhead replays each step's "
        "kernels as CUDA graphs (far fewer launches, for small networks whose steps wait on the host; one process "
        "only); max-autotune-no-cudagraphs times kernel variants while compiling",
    )
    ema_decay: float | None = Field(
        None, ge=0, lt=1, description="keep an exponential moving average of the weights (e.g. 0.99); evaluated and "
        "saved instead of the raw weights",
    )
    warmup_fraction: float = Field(0.25, gt=0, lt=1, description="onecycle: share of steps spent warming up")
    initial_lr_fraction: float = Field(
        0.04, gt=0, le=1, description="onecycle: the warm-up starts at this fraction of the peak lr",
    )
    final_lr_fraction: float = Field(
        0.0, ge=0, le=1, description="onecycle: the decay ends at this fraction of the peak lr",
    )
    lookahead_steps: int | None = Field(
        None, ge=1, description="every this many steps, pull the weights toward a slow copy and restart from it "
        "(Lookahead, with airbench's schedule: no pull early, up to 0.95^steps late); training ends on the slow copy",
    )
    identity_init: bool = Field(
        False, description="fastnet families: start each convolution as the identity on its first channels (dirac "
        "init), for faster early training on natural images; not for images with flat backgrounds "
        "(kiln/models/fastnet.py)",
    )
    bias_lr_scale: float = Field(
        1.0, gt=0, le=1000, description="learning-rate multiplier for norm and bias parameters (not weight-decayed "
        "unless decay_biases); fast CIFAR recipes with BatchNorm scales frozen train the shifts much faster than the "
        "weights",
    )
    decay_biases: bool = Field(
        False, description="also weight-decay norm and bias parameters, by the same amount per step as the weights: "
        "their coefficient is weight_decay / bias_lr_scale, since their lr is bias_lr_scale times larger (airbench)",
    )
    whiten_bias_epochs: int | None = Field(
        None, ge=0, description="fastnet families: the whitening layer's bias trains for this many epochs at the lr "
        "whiten_bias_schedule gives it, then its lr is zero (with lookahead it moves once more, at the next pull), "
        "as in airbench (3); None: it trains like the other biases",
    )
    whiten_bias_schedule: Literal["base_lr", "shift_lr_to_zero"] = Field(
        "base_lr", description="with whiten_bias_epochs, how the whitening bias's lr runs: base_lr: the base lr, "
        "following the run's schedule, then zero (airbench94); shift_lr_to_zero: the norm shifts' lr (lr x "
        "bias_lr_scale, decayed as they are with decay_biases), falling linearly to zero by the end of those epochs "
        "(airbench's Muon record)",
    )
    keep_hardest: float | None = Field(
        None, gt=0, lt=1, description="train on this share of each batch: the examples a small proxy network "
        "(fastnet at 32/64/64 channels, learning alongside from every 4th batch with this recipe's optimizer "
        "settings, so they should suit a fastnet) finds hardest, as airbench96_faster does to reach its accuracy in "
        "about 20 % less time (kiln/hard_examples.py); train loss, accuracy and img/s are then those of the kept "
        "examples; one process only; compression's fine-tuning and distillation train without it",
    )
    cuda_graph: bool = Field(
        False, description="on CUDA, capture each whole training step (forward, backward, optimizer step) once as a "
        "CUDA graph and replay it, so that a small network's steps stop waiting on the host issuing their kernels "
        "(kiln/step_graph.py); sgd or muon, bf16 or fp32; steps run eagerly, with a log line saying why, on a CPU, "
        "under data parallelism, and with fp16, adamw, keep_hardest or compile_mode=reduce-overhead",
    )
    checkpoint_interval_s: float = Field(
        0.0, ge=0, description="seconds between checkpoints (one is always written after the last epoch); 0: after "
        "every epoch. On a GPU an epoch of a small model can take less time than writing its checkpoint",
    )
    devices: int | Literal["auto"] = Field(
        1, description="data-parallel processes (DDP, launched with torchrun): one per GPU; auto: every visible "
        "GPU; on a CPU-only host N > 1 runs N gloo processes (for testing, not speed). batch_size stays global",
    )
    seed: int = 0

    @field_validator("devices")
    @classmethod
    def _positive_devices(cls, value: Any) -> Any:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be at least 1, or auto")
        return value

    @field_validator("identity_init")
    @classmethod
    def _identity_init_needs_fastnet(cls, value: bool, info: ValidationInfo) -> bool:
        model = _model_outside(info, FASTNET_MODELS)
        if value and model:
            raise ValueError(f"applies to the {FASTNET_NAMES} models, not {model} (the cifar10-fast and cifar10-long "
                             "profiles turn it on): add --set train.identity_init=false")  # fmt: skip
        return value

    @field_validator("whiten_bias_epochs")
    @classmethod
    def _whitening_needs_fastnet(cls, value: int | None, info: ValidationInfo) -> int | None:
        model = _model_outside(info, FASTNET_MODELS)
        if value is not None and model:
            raise ValueError(f"applies to the whitening layer of the {FASTNET_NAMES} models, not {model} (the "
                             "cifar10-fast and cifar10-long profiles set it): add --set "
                             "train.whiten_bias_epochs=null")  # fmt: skip
        return value

    @field_validator("whiten_bias_schedule")
    @classmethod
    def _schedule_needs_whitening_epochs(cls, value: str, info: ValidationInfo) -> str:
        if value != "base_lr" and "whiten_bias_epochs" in info.data and info.data["whiten_bias_epochs"] is None:
            raise ValueError(f"{value} schedules the whitening bias over train.whiten_bias_epochs, which is not set: "
                             "add --set train.whiten_bias_epochs=3 (fastnet families only), or --set "
                             "train.whiten_bias_schedule=base_lr")  # fmt: skip
        return value

    @field_validator("optimizer")
    @classmethod
    def _muon_needs_normalized_convolutions(cls, value: str, info: ValidationInfo) -> str:
        model = _model_outside(info, NORMALIZED_CONV_MODELS)
        if value == "muon" and model:
            raise ValueError(f"muon holds each convolution's filters at a fixed norm, which only models that "
                             f"normalize after every convolution tolerate ({', '.join(NORMALIZED_CONV_MODELS)}), "
                             f"not {model}: add --set train.optimizer=sgd")  # fmt: skip
        return value

    @field_validator("compile_mode")
    @classmethod
    def _mode_needs_compiling(cls, value: str, info: ValidationInfo) -> str:
        if value != "default" and info.data.get("compile") == "off":
            raise ValueError(f"{value} is how torch.compile compiles, but train.compile=off compiles nothing: add "
                             "--set train.compile=on, or --set train.compile_mode=default")  # fmt: skip
        return value

    @field_validator("lookahead_steps")
    @classmethod
    def _one_weight_average(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("ema_decay") is not None:
            raise ValueError("and train.ema_decay both average the weights, so only one can be set (the "
                             "cifar10-long profile uses lookahead): add --set "
                             "train.lookahead_steps=null or --set train.ema_decay=null")  # fmt: skip
        return value

    @field_validator("lr", "weight_decay", "momentum", "label_smoothing", "muon_lr", "muon_momentum", "keep_hardest",
                     mode="before")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        # Before the range checks, which would otherwise answer "NaN" with "should be greater than 0".
        try:
            number = float(value)
        except (TypeError, ValueError):
            return value  # not a number at all: the float type check reports it
        if not math.isfinite(number):
            raise ValueError("must be a finite number, e.g. 0.001")
        return value


def _model_outside(info: ValidationInfo, families: tuple[str, ...]) -> str | None:
    """The section's model when it is valid but not one of `families` (None when it is one, or was itself invalid:
    its own error is the one to report)."""
    model = info.data.get("model")
    return model if model is not None and model not in families else None


class EvaluateConfig(Section):
    min_accuracy: float = Field(0.0, ge=0, le=1, description="the gate: below this the model is not blessed")
    on_gate_failure: Literal["stop", "continue"] = Field(
        "stop", description="continue: package anyway, marked not blessed",
    )
    batch_size: int = Field(512, ge=1)
    tta: Literal["none", "flip", "flip_translate", "flip_translate_weighted"] = Field(
        "none",
        description="also report accuracy with test-time augmentation (averaged over flipped / 1-pixel-shifted "
        "views; flip_translate_weighted: airbench's weights and mean of log-probabilities); the gate and the "
        "bundle use the plain model",
    )


class ExportConfig(Section):
    opset: int = Field(18, ge=13, le=23)
    parity_samples: int = Field(256, ge=1, description="test images compared between PyTorch and onnxruntime")
    parity_atol: float = Field(1e-4, gt=0, description="max |prob_torch - prob_onnx| allowed")
    min_top1_agreement: float = Field(0.99, ge=0, le=1)


class CompressConfig(Section):
    """Which compressed variants to build, how, and the policy that picks the one to ship (kiln/compression/)."""

    # Deprecated single switch, kept so that `method: none` configs still work; `variants` is the real setting.
    method: Literal["int8_static", "none"] | None = Field(
        None, description="deprecated: none = variants [], int8_static = variants [int8_static]; overrides variants",
    )
    variants: list[Literal[
        "int8_static", "int8_dynamic", "fp16", "prune_structured", "prune_unstructured", "distill", "distill_int8"
    ]] = Field(
        ["int8_static", "int8_dynamic", "fp16"],
        validate_default=True,
        description="variants to build, each exported to ONNX and re-evaluated against fp32 (which is always "
        "measured); prune_* and distill* fine-tune/train and need the train output",
    )
    objective: Literal["latency", "throughput", "size"] = Field(
        "latency",
        description="among variants within max_accuracy_drop of fp32 (fp32 included): lowest batch-1 p50 latency, "
        "highest batch-64 throughput, or smallest file",
    )
    max_accuracy_drop: float = Field(
        0.005, ge=0, le=1, description="a variant may ship only if within this of fp32's accuracy (0.005 = 0.5 pt)",
    )
    exclude_from_selection: list[Literal[
        "int8_static", "int8_dynamic", "fp16", "prune_structured", "prune_unstructured", "distill", "distill_int8"
    ]] = Field(
        ["fp16", "int8_dynamic"],
        description="built and reported but never shipped. By default fp16 (it is for GPU serving, and the policy "
        "ranks by CPU measurements, where fp16 is not representative) and int8_dynamic (its activation scales are "
        "computed over each whole batch, so an image's probabilities depend on the other images sent with it)",
    )
    calibration_samples: int = Field(256, ge=1, description="training images used to calibrate activation ranges")
    calibrate_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    per_channel: bool = True
    prune_amount: float = Field(
        0.3, gt=0, lt=1, description="prune_structured: share of channels removed from every prunable layer",
    )
    sparsity: float = Field(
        0.5, gt=0, lt=1, description="prune_unstructured: share of all conv/linear weights set to zero (global L1)",
    )
    finetune_epochs: int = Field(2, ge=0, description="fine-tuning epochs after pruning (0: none)")
    finetune_lr_scale: float = Field(0.1, gt=0, le=1, description="fine-tuning peak lr = train.lr x this (and "
                                     "train.muon_lr x this, with muon)")
    distill_student: Literal["slim", "mlp", "simple_cnn", "lenet", "resnet9"] = Field(
        "slim", description="slim: the teacher's own architecture with every width scaled by distill_width",
    )
    distill_width: float = Field(
        0.45, gt=0, le=1, description="slim student: channel width multiplier (0.45: about 1/5 of resnet9's weights)",
    )
    distill_temperature: float = Field(4.0, gt=0, le=100, description="softens teacher and student logits")
    distill_alpha: float = Field(0.9, ge=0, le=1, description="weight of the soft-target loss; 1 - alpha: hard labels")
    distill_epochs: int = Field(10, ge=1, description="student training epochs")
    latency_runs: int = Field(50, ge=1, description="batch-1 runs timed per variant")
    throughput_seconds: float = Field(1.0, gt=0, le=600, description="time spent running batches of 64 per variant")
    timing_threads: int | None = Field(
        None, ge=1, description="onnxruntime intra-op threads for the latency and throughput timings (accuracy is "
        "measured on every core); None: one per physical core (as served). 1 gives steadier ratios on a shared machine",
    )

    @field_validator("variants")
    @classmethod
    def _resolve_variants(cls, variants: list[str], info) -> list[str]:
        method = info.data.get("method")
        if method is not None:
            variants = [] if method == "none" else [method]
        duplicates = sorted({name for name in variants if variants.count(name) > 1})
        if duplicates:
            raise ValueError(f"lists {', '.join(duplicates)} more than once")
        if "distill_int8" in variants and "distill" not in variants:
            raise ValueError("distill_int8 quantizes the distilled student: add distill to the list too")
        return variants


class PackageConfig(Section):
    model_name: str = Field("kiln-classifier", pattern=r"^[a-z0-9][a-z0-9._-]*$")
    version: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$", description="None: derived from content",
    )
    archive: bool = Field(True, description="also write bundle.tar.gz")
    triton_max_batch: int = Field(64, ge=1, le=4096, description="max_batch_size of the bundle's Triton config")
    registry: bool = Field(True, description="add the bundle to the model registry under <store.root>/registry")
    max_regression: float = Field(
        0.005, ge=0, le=1,
        description="promote to production only if test accuracy is at most this below production's (0.005 = 0.5 pt)",
    )

    not_in_key: ClassVar[frozenset[str]] = frozenset({"registry", "max_regression"})


class StoreConfig(Section):
    root: str = Field("artifacts", description="any fsspec URL: a local path, memory://..., s3://bucket/prefix")
    on_corrupt: Literal["recompute", "stop"] = Field(
        "recompute",
        description="a stored output whose files no longer match their sha256: set it aside and recompute, or stop",
    )
    prefect_results: bool = Field(
        True,
        description="keep Prefect's task results and cache records under <root>/.prefect-results, shared by every "
        "worker that reaches the store; false leaves them to Prefect's result storage settings",
    )


class RetrainPolicy(DriftLimits):
    """When the retrain flow retrains: any drift limit passed, new images, or the class list changed (kiln/drift.py)."""

    min_new_samples: int = Field(1, ge=1, description="retrain when at least this many training images are new")


class PipelineConfig(BaseModel):
    """The whole pipeline's configuration; the training flow's only parameter."""

    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)

    profile: str = Field("quickstart", description="informational: the profile this config was built from")
    data: DataConfig = DataConfig()
    validation: ValidateConfig = Field(ValidateConfig(), alias="validate")
    augment: AugmentConfig = AugmentConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    export: ExportConfig = ExportConfig()
    compress: CompressConfig = CompressConfig()
    package: PackageConfig = PackageConfig()
    store: StoreConfig = StoreConfig()


def load_config(
    profile: str | None = None, config_file: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> PipelineConfig:
    """Build the pipeline config: profile YAML, then the config file, then `section.key=value` overrides.

    The profile is `profile`, else the file's `profile:` key, else quickstart. Raises ConfigError.
    """
    file_values = _read_yaml(Path(config_file)) if config_file is not None else {}
    profile_name = profile or file_values.get("profile") or "quickstart"
    values = _deep_merge(profile_values(profile_name), file_values)
    values["profile"] = profile_name
    for override in overrides:
        _apply_override(values, override)
    return parse_config(values)


def parse_config(values: dict[str, Any]) -> PipelineConfig:
    """Validate a plain dict as a PipelineConfig; raises ConfigError listing every bad key."""
    try:
        config = PipelineConfig.model_validate(values)
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None
    _check_cross_section(config)
    return config


def profile_values(name: str, _extending: tuple[str, ...] = ()) -> dict[str, Any]:
    """The raw values of a named profile shipped with kiln; one with `extends: BASE` is BASE's values with its own
    merged over them, key by key."""
    if name not in PROFILE_NAMES:
        raise ConfigError(f"unknown profile {name!r}; choose one of: {', '.join(PROFILE_NAMES)}")
    text = resources.files("kiln.profiles").joinpath(f"{name}.yaml").read_text()
    values = yaml.safe_load(text) or {}
    base = values.pop("extends", None)
    if base in _extending:
        raise ConfigError(f"profile {name!r} extends {base!r}, which extends it again; break the cycle")
    return _deep_merge(profile_values(base, (*_extending, name)), values) if base else values


FLAT_BACKGROUND_SOURCES = ("digits", "mnist", "fashion-mnist")


def _check_cross_section(config: PipelineConfig) -> None:
    if config.train.identity_init and config.data.source in FLAT_BACKGROUND_SOURCES:
        raise ConfigError(
            f"train.identity_init is for natural images, not {config.data.source}: on a flat background it makes "
            "the weights blow up (kiln/models/fastnet.py); add --set train.identity_init=false"
        )
    if config.data.source == "imagefolder" and not config.data.uri:
        raise ConfigError(
            "data.uri is required when data.source is imagefolder: "
            "pass --set data.uri=PATH_OR_URL (a folder, .tar.gz/.zip archive, http(s) URL or .csv manifest)"
        )
    # Caught here rather than at the registry step, after a whole training run.
    if config.package.registry and fsspec.utils.get_protocol(config.store.root) not in ("file", "local"):
        raise ConfigError(
            f"the model registry needs a local store.root, but it is {config.store.root!r}: set store.root to a "
            "local path or turn the registry off with --set package.registry=false"
        )


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"config file {path} is not valid YAML{line}: {problem}; fix the syntax") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must be a mapping of sections (data:, train:, ...), not a list or scalar")
    return loaded


def _apply_override(values: dict[str, Any], override: str) -> None:
    dotted, sep, raw = override.partition("=")
    parts = dotted.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {override!r} must look like section.key=value, e.g. --set train.epochs=5")
    section, key = parts
    target = values.setdefault(section, {})
    if not isinstance(target, dict):
        raise ConfigError(f"--set {override!r}: {section!r} is not a config section")
    target[key] = _override_value(raw.strip())


def _override_value(raw: str) -> Any:
    """Scalars stay text so the field's type decides (version=1.0 stays "1.0"); null/~/empty mean None;
    YAML lists and mappings are parsed."""
    if raw in ("", "null", "~", "None"):
        return None
    if raw[0] in "[{":
        try:
            return yaml.safe_load(raw)
        except yaml.YAMLError:
            return raw
    return raw


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _describe(error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            problems.append(f"{where}: unknown key; {_known_keys_hint(item['loc'])}")
        else:
            problems.append(f"{where}: {item['msg']} (got {item.get('input')!r})")
    return "invalid configuration:\n  " + "\n  ".join(problems)


def _known_keys_hint(location: tuple[Any, ...]) -> str:
    model: type[BaseModel] = PipelineConfig
    for part in location[:-1]:
        field = _field_by_name_or_alias(model, str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return "check the spelling"
        model = field.annotation
    names = [field.alias or name for name, field in model.model_fields.items()]
    return "valid keys here: " + ", ".join(names)


def _field_by_name_or_alias(model: type[BaseModel], name: str):
    for field_name, field in model.model_fields.items():
        if name in (field_name, field.alias):
            return field
    return None
