"""Typed configuration: one dataclass per component, loaded from YAML, overridden from the CLI.

A config file is a mapping of sections (``experiment``, ``data``, ``preprocessing``, ``model``,
``diffusion``, ``training``, ``ttt``) to fields. Loading is strict, as in nanoGPT: an unknown key
or a value of the wrong type is an error that names the key and lists what is allowed. The
resolved config is saved beside every output (``save_config``) and travels inside checkpoints
(``Config.to_dict`` / ``Config.from_dict``).

Example::

    cfg = load_config("Resources/Configs/demo.yaml", overrides=["training.lr=1e-4"])
    cfg.training.lr  # 1e-4
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "Resources" / "Configs"


class ConfigError(ValueError):
    """A config key or value that is not allowed."""


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------
@dataclass
class ExperimentConfig:
    name: str = "clinfusediff"
    seed: int = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms + cudnn.deterministic
    output_dir: str = "outputs"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int = 0  # torch intra-op threads; 0 = torch's default


@dataclass
class TabularModalityConfig:
    """A tabular modality read from a CSV file (one row per patient)."""

    file: str = "clinical_data.csv"  # relative to data.root unless absolute
    columns: list[str] = field(default_factory=list)  # empty = every column but the id column
    categorical: list[str] = field(default_factory=list)  # columns treated as categories


@dataclass
class DataConfig:
    root: Optional[str] = None  # cohort folder; None = generate the embedded synthetic cohort
    layout: Literal["auto", "generic", "brats", "tabular"] = "auto"
    # Modality order of every batch. Image names must be registered image modalities; tabular
    # names must be declared in `tabular`.
    modalities: list[str] = field(
        default_factory=lambda: ["mri_t1", "mri_t1ce", "mri_t2", "mri_flair", "ct", "pet", "clinical"]
    )
    tabular: dict[str, TabularModalityConfig] = field(
        default_factory=lambda: {
            "clinical": TabularModalityConfig(
                file="clinical_data.csv", columns=[], categorical=["sex"]
            )
        }
    )
    id_column: str = "patient_id"
    outcome_file: str = "outcomes.csv"  # relative to root; holds label / time / event per patient
    task: Literal["classification", "regression", "survival"] = "classification"
    label_column: str = "label"
    time_column: str = "survival_months"
    event_column: str = "event"
    num_classes: int = 2
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    split_file: Optional[str] = None  # default: <output>/split.json, written once and reused
    # Missing-modality simulation during training. subset_sampling: how the kept set is drawn —
    # "uniform_subsets" (every allowed non-empty subset of what the patient has equally likely,
    # as the all-subsets evaluation weighs them), "uniform_size" (a size uniformly, then a subset
    # of that size), or "independent" (each modality dropped with drop_prob; 1-2-modality sets
    # are then rare). min_keep and excluded_combinations restrict every mode.
    subset_sampling: Literal["independent", "uniform_subsets", "uniform_size"] = "uniform_subsets"
    drop_prob: float = 0.3  # "independent" only: per-modality drop probability (a float for all ...)
    drop_prob_per_modality: dict[str, float] = field(default_factory=dict)  # ... or per name
    min_keep: int = 1
    excluded_combinations: list[list[str]] = field(default_factory=list)  # never drawn in training
    augment: bool = True
    num_workers: int = 0
    cache_dir: Optional[str] = None  # default: <output>/cache
    # The embedded synthetic cohort (used when root is None).
    synth_patients: int = 120
    synth_shape: list[int] = field(default_factory=lambda: [96, 96, 64])
    synth_site_shift: Literal["none", "mild", "strong", "severe"] = "mild"
    synth_missing_rate: float = 0.1
    synth_seed: int = 0


@dataclass
class PreprocessingConfig:
    spacing: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # mm, RAS axes
    target_shape: list[int] = field(default_factory=lambda: [128, 128, 128])
    mask_backend: Literal["fallback", "deepbet", "totalsegmentator", "none"] = "fallback"
    mask_modality: Optional[str] = None  # which available modality the mask comes from
    # The brain mask is computed on a grid no finer than this (mm; the mask backend's cost grows
    # with the voxel count), then resampled (nearest) onto the output grid.
    mask_spacing: float = 2.0
    skull_strip: bool = False
    crop_to_brain: bool = True
    crop_margin: int = 4  # voxels around the brain bounding box
    # When the brain box (+margin) is larger than target_shape at `spacing`: "resize" coarsens the
    # output spacing uniformly so the whole box fits; "crop" keeps `spacing` and cuts centrally.
    fit: Literal["resize", "crop"] = "resize"
    min_overlap: float = 0.5  # modalities of a patient must share this fraction of the smaller FOV
    mri_percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    pet_percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    ct_window: list[float] = field(default_factory=lambda: [-100.0, 200.0])  # HU
    totalsegmentator_fast: bool = True
    totalsegmentator_device: Literal["cpu", "gpu"] = "cpu"


@dataclass
class ModelConfig:
    image_encoder: Literal["resnet10", "resnet18", "resnet34", "resnet50"] = "resnet50"
    encoder_widths: list[int] = field(default_factory=lambda: [64, 128, 256, 512])  # block_inplanes
    first_stride: int = 1  # stride of the first convolution (2 = cheaper on a CPU)
    first_kernel: int = 7
    # Encoder normalisation; group norm works for any sub-batch size and single patients.
    encoder_norm: Literal["batch", "group", "instance"] = "group"
    shared_image_encoder: bool = False  # one encoder for all images + modality embedding
    embed_dim: int = 256  # E: shared token width
    tabular_hidden: list[int] = field(default_factory=lambda: [128, 128])
    categorical_embed_dim: int = 8
    fusion: Literal["mean", "attention", "diffusion"] = "diffusion"
    # Attention/mean fusion: after training, fit a per-modality token imputer on the training
    # patients' tokens; at prediction time the missing modalities' tokens are imputed from the
    # available ones and the fusion sees the complete set (models/imputer.py; README, issue 11).
    # Ignored by diffusion fusion, which imputes the fused vector itself.
    token_imputer: bool = False
    attention_heads: int = 4
    attention_layers: int = 1
    dropout: float = 0.1
    head_hidden: int = 128


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "cosine"] = "cosine"
    prediction_type: Literal["epsilon", "sample", "v_prediction"] = "v_prediction"
    sampler: Literal["ddim", "ddpm"] = "ddim"
    num_inference_steps: int = 20
    eta: float = 0.0  # DDIM stochasticity (0 = deterministic)
    denoiser_depth: int = 4
    denoiser_heads: int = 4
    denoiser_mlp_ratio: float = 4.0
    cond_dropout: float = 0.15  # classifier-free guidance training dropout
    guidance_scale: float = 1.0
    teacher: Literal["stopgrad", "ema"] = "ema"
    ema_decay: float = 0.99
    num_samples: int = 8  # K samples for uncertainty


@dataclass
class TrainingConfig:
    epochs: int = 100
    batch_size: int = 4
    lr: float = 3e-4
    weight_decay: float = 1e-2
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: int = 2
    grad_accum_steps: int = 1
    grad_clip: float = 1.0
    amp: Literal["none", "bf16", "fp16"] = "bf16"
    grad_checkpointing: bool = False
    # The token imputer (model.token_imputer): fixed budget, fitted after the last epoch.
    imputer_steps: int = 2000
    imputer_batch_size: int = 256
    imputer_lr: float = 1e-3
    early_stopping_patience: int = 20
    # Validation metric for the best checkpoint / early stopping: a val_* metric of the task, on
    # the full modality set (val_auroc, val_c_index, ...) or averaged over every non-empty modality
    # subset of the validation patients (val_mean_subsets_auroc / _c_index / _mae), the way the
    # all-subsets evaluation scores a model (diffusion: deterministic DDIM eta=0, K=1, fixed seed).
    # Task-independent names, resolved by `load_config` (the saved config shows the result):
    # "auto" = the task's subset mean (val_mean_subsets_auroc | _c_index | _mae), "auto_full_set"
    # = the task's full-set metric (val_auroc | val_c_index | val_mae). See TASK_MONITORS.
    monitor: str = "auto"
    # Monitor of stage 1 (encoder training) of two_stage; null = `monitor`.
    encoder_monitor: Optional[str] = None
    # best: keep the epoch with the best monitor (+ early stopping); last: fixed schedule, the final
    # epoch is the selected checkpoint (best.pt == last epoch), no early stopping.
    # cv: K-fold cross-validation over the train + validation patients (cv_folds folds, each run
    # for the full `epochs`) picks the epoch count with the best mean monitor over folds; the
    # final model then trains on the train part for that many epochs (fixed schedule). For small
    # cohorts, where one validation split of a few dozen patients picks a noisy epoch. Default:
    # best (one validation split; a warning below 50 validation patients names cv and last).
    selection: Literal["best", "last", "cv"] = "best"
    encoder_selection: Optional[Literal["best", "last", "cv"]] = None  # stage 1; null = `selection`
    cv_folds: int = 5
    lambda_pred: float = 1.0
    lambda_diff: float = 1.0
    lambda_recon: float = 0.1
    lambda_contra: float = 0.1
    contra_temperature: float = 0.1
    feature_bank_size: int = 256  # training features stored in the checkpoint for TTT
    log_every: int = 10
    fusions: list[str] = field(default_factory=lambda: ["mean", "attention", "diffusion"])
    # end_to_end: every model trains its encoders; two_stage: encoders trained once (stage 1,
    # encoder_epochs, with stage1_fusion), then each fusion + head on cached frozen tokens (epochs).
    stage: Literal["end_to_end", "two_stage"] = "end_to_end"
    encoder_epochs: int = 10
    stage1_fusion: Literal["mean", "attention", "diffusion"] = "mean"


@dataclass
class TTTConfig:
    enabled: bool = True
    steps: int = 10
    lr: float = 1e-3
    params: Literal["norm", "adaln", "fusion", "lora"] = "adaln"
    lora_rank: int = 4
    adapt_encoder_norms: bool = False
    w_recon: float = 1.0
    w_contra: float = 0.5
    w_diff: float = 1.0
    contra_temperature: float = 0.1
    collapse_kl_max: float = 1.0  # reject an update whose prediction moved further than this
    min_entropy: float = 0.01  # reject an update that makes the prediction near one-hot from nowhere
    # Attention checkpoints: MiDl TTT (ttt/midl.py), an objective on the prediction itself. Off
    # unless asked for (--ttt): measured in the research experiment, it does not beat the model
    # without it (README, "What TTT does").
    midl_params: Literal["norm", "norm_qkv"] = "norm_qkv"
    midl_steps: int = 3
    midl_lr: float = 0.01
    midl_views: int = 2
    midl_anchor: float = 1.0
    midl_kl_max: Optional[float] = None  # acceptance threshold on KL(stored || adapted); None = none


@dataclass
class Config:
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    preprocessing: PreprocessingConfig = field(default_factory=PreprocessingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    ttt: TTTConfig = field(default_factory=TTTConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        return _build(cls, d, "")


# Task-independent monitor names -> the metric used for each task (trainer.VAL_METRICS lists them).
TASK_MONITORS: dict[str, dict[str, str]] = {
    "auto": {"classification": "val_mean_subsets_auroc", "survival": "val_mean_subsets_c_index",
             "regression": "val_mean_subsets_mae"},
    "auto_full_set": {"classification": "val_auroc", "survival": "val_c_index",
                      "regression": "val_mae"},
}


def resolve_monitor(name: Optional[str], task: str) -> Optional[str]:
    """``auto`` / ``auto_full_set`` -> the task's metric name; any other name is returned as is
    (the trainer checks it against the task's metrics and names the allowed ones)."""
    if name in TASK_MONITORS:
        return TASK_MONITORS[name][task]
    return name


def resolve_task_defaults(cfg: "Config") -> "Config":
    """The config with task-dependent settings resolved (``training.monitor``,
    ``training.encoder_monitor``); a copy when anything changes."""
    tc = cfg.training
    mon = resolve_monitor(tc.monitor, cfg.data.task)
    enc = resolve_monitor(tc.encoder_monitor, cfg.data.task)
    if mon == tc.monitor and enc == tc.encoder_monitor:
        return cfg
    return dataclasses.replace(cfg, training=dataclasses.replace(tc, monitor=mon, encoder_monitor=enc))


# --------------------------------------------------------------------------------------------
# Strict construction from plain data
# --------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{origin.__name__}[{args}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Return ``value`` checked against ``tp`` (ints are accepted for floats, nothing else)."""
    origin = typing.get_origin(tp)
    bad = ConfigError(
        f"config key {key!r}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})"
    )
    if tp is Any:
        return value
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(
                f"config key {key!r}: {value!r} is not one of {list(typing.get_args(tp))}"
            )
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key)
            except ConfigError:
                continue
        raise bad
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, key + ".")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        kt, vt = typing.get_args(tp)
        return {_coerce(kt, k, key): _coerce(vt, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise ConfigError(f"config key {key!r}: unsupported field type {tp!r}")  # internal


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    odd = [k for k in data if not isinstance(k, str)]
    if odd:
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(f"config key {odd[0]!r} ({type(odd[0]).__name__}) in {where} is not a name; "
                          f"allowed keys: {names}")
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(
            f"unknown config key {prefix + unknown[0]!r} in {where}; allowed keys: {names}"
        )
    kwargs = {k: _coerce(hints[k], v, prefix + k) for k, v in data.items()}
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# Files and overrides
# --------------------------------------------------------------------------------------------
def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.get(p)
        if nxt is None:
            nxt = cur[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
        cur = nxt
    cur[parts[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a raw config dict."""
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(
                f"override {ov!r} must look like section.key=value, e.g. training.lr=1e-4"
            )
        key, text = ov.split("=", 1)
        key = key.strip()
        if key.startswith("--"):
            key = key[2:]
        try:
            value = yaml.safe_load(text) if text.strip() != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {ov!r}: the value {text!r} is not valid YAML "
                              f"({_yaml_problem(e)}); close every bracket and quote, e.g. "
                              "preprocessing.spacing=[2,2,2]") from e
        # YAML 1.1 reads "1e-4" as a string; accept it as a float.
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in ".eE") else value
            except ValueError:
                pass
        _set_dotted(raw, key, value)
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last
    one silently, so a second ``training:`` section would drop the first)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[str, int] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key_node.value!r} appears twice (lines {seen[key_node.value]} "
                        f"and {key_node.start_mark.line + 1})", key_node.start_mark)
                seen[key_node.value] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(e: Exception) -> str:
    """One line from a YAML error: the problem and its line/column."""
    problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def resolve_config_path(path: str | os.PathLike) -> Path:
    """A config path, or a bare name (``demo``) looked up in ``Resources/Configs``."""
    p = Path(path)
    if p.exists():
        return p
    for cand in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"):
        if cand.exists():
            return cand
    known = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"config {str(path)!r} not found; give a YAML path or one of {known}")


def load_config(
    path: str | os.PathLike | None = None, overrides: Optional[list[str]] = None
) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides.

    Task-dependent names are resolved (``training.monitor: auto`` -> ``val_mean_subsets_c_index``
    for ``data.task: survival``; see ``resolve_task_defaults``).
    """
    raw: dict[str, Any] = {}
    if path is not None:
        p = resolve_config_path(path)
        if p.is_dir():
            raise ConfigError(f"config {p} is a folder; give a YAML file (e.g. {p / 'config.yaml'}) "
                              "or a name in Resources/Configs")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"config {p} is not UTF-8 text (byte {e.start}: {e.reason}); save it "
                              "as UTF-8 YAML") from e
        except OSError as e:
            raise ConfigError(f"config {p} cannot be read ({e.strerror or e})") from e
        try:
            loaded = yaml.load(text, Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as e:
            problem = _yaml_problem(e)
            hint = ("indent with spaces, not tabs" if "'\\t'" in problem else
                    "keep each key once per section" if "appears twice" in problem else
                    "close every bracket and quote; indent with spaces")
            raise ConfigError(f"config {p} is not valid YAML ({problem}); fix the file ({hint})") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
        raw = loaded
    raw = apply_overrides(raw, list(overrides or []))
    cfg = Config.from_dict(raw)
    check_values(cfg)
    return resolve_task_defaults(cfg)


# Counts that must be at least 1 (a zero trains or samples nothing, and fails later with a message
# about something else, e.g. training.epochs=0 -> "encoders/last.pt not found").
POSITIVE_INTS = ("training.epochs", "training.encoder_epochs", "training.batch_size",
                 "training.grad_accum_steps", "diffusion.num_train_timesteps",
                 "diffusion.num_inference_steps", "diffusion.num_samples", "model.embed_dim")


def check_values(cfg: Config) -> None:
    """Refuse values of the right type that cannot work (``POSITIVE_INTS`` below 1).

    Raises:
        ConfigError: naming the key, the value and what is allowed.
    """
    for dotted in POSITIVE_INTS:
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value < 1:
            raise ConfigError(f"config key {dotted!r}: {value} is not allowed; give an integer >= 1")
    for dotted in ("preprocessing.spacing", "preprocessing.target_shape", "data.synth_shape"):
        section, key = dotted.split(".")
        values = getattr(getattr(cfg, section), key)
        if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
            raise ConfigError(f"config key {dotted!r}: {values} is not allowed; give three positive "
                              "finite numbers (x, y, z)")

    def no_nan(obj: Any, key: str) -> None:
        if isinstance(obj, float) and math.isnan(obj):
            raise ConfigError(f"config key {key!r}: NaN is not allowed; give a number")
        if isinstance(obj, dict):
            for k, v in obj.items():
                no_nan(v, f"{key}.{k}" if key else str(k))
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                no_nan(v, f"{key}[{i}]")

    no_nan(cfg.to_dict(), "")


def save_config(cfg: Config, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML, atomically."""
    from .utils import atomic_write_text

    return atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# --------------------------------------------------------------------------------------------
# Seeding
# --------------------------------------------------------------------------------------------
def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; optionally ask torch for deterministic algorithms."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def seed_worker(worker_id: int) -> None:
    """``DataLoader(worker_init_fn=seed_worker)``: seed numpy/python from torch's worker seed."""
    import numpy as np
    import torch

    s = torch.initial_seed() % (2**32)
    np.random.seed(s)
    random.seed(s)
