"""The experiment's own settings (``sweep:`` section) next to the product's config sections."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import yaml

from ..config import Config, ConfigError, _build, apply_overrides, resolve_config_path

METHODS = (
    "attention",        # attention fusion + head, uniform subsets (the strong baseline; also the teacher)
    "mean",             # mean (HeMIS) fusion + head, uniform subsets
    "attention_size",   # attention, subsets drawn uniformly over their size
    "attention_indep",  # attention, independent drop p = data.drop_prob (main's old sampler)
    "regressor",        # the denoiser's network trained by MSE to the teacher's full-set fusion (control)
    "diffusion",        # the denoiser trained by the diffusion loss alone (decoupled), K samples
    "diffusion_main",   # main's coupled diffusion fusion (compute_losses), K samples
    "dedicated",        # one attention model per subset (a stated sample of subsets)
    "oracle_full",      # the teacher on the full set, whatever the subset (sees what is missing)
    "oracle_hidden",    # logistic regression on the hidden features visible in the subset
    "attention_nested",  # attention trained so that adding a modality does not hurt (ranking + full-set distillation)
    "attention_ttt",    # the attention teacher + episodic MiDl TTT (settings tuned on validation)
    "attention_ttt_online",  # the attention teacher + online MiDl TTT per (subset, site) stream
    "regressor_head",   # cross-fitted MSE-regressor imputers + a head fine-tuned on their imputations
    "diffusion_head",   # cross-fitted diffusion imputers + a head fine-tuned on their samples
    "attention_unseen",  # attention trained without the sweep.unseen combinations (never drawn)
    "regressor_unseen",  # the regressor control trained without them, on attention_unseen's teacher
    "flow",             # conditional flow matching (rectified flow) to the teacher's z_full, few Euler steps
    "tokens_flow",      # per-modality token imputation by flow matching (IMDer-style), teacher on the full set
    "tokens_regressor",  # the same token imputer trained by MSE (deterministic control)
    "tokens_mean",      # missing tokens = the training mean token, teacher on the full set (control of the imputers)
)


@dataclass
class SweepConfig:
    """Sizes, seeds, methods and budgets of the research experiment."""

    n_train: int = 1000
    n_val: int = 300
    n_test: int = 2000
    cohort_seed: int = 0
    workers: int = 2  # processes for cohort generation and preprocessing
    stage1_seeds: list[int] = field(default_factory=lambda: [0])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])  # stage-2 training seeds
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    reference: str = "attention"
    # stage 1 (encoders): fixed schedule, no selection
    stage1_epochs: int = 12
    stage1_batch_size: int = 16
    stage1_lr: float = 2.0e-3
    unimodal_weight: float = 1.0  # per-modality heads: every token must predict the label alone
    aux_weight: float = 0.5  # image tokens regress tumour / oedema / enhancing volumes (from the seg)
    # stage 2 (fusion on frozen tokens): fixed schedule, no selection
    steps: int = 2000
    diffusion_steps: int = 4000
    batch_size: int = 256
    lr: float = 1.0e-3
    weight_decay: float = 1.0e-4
    ema_decay: float = 0.999
    samples: int = 4  # K diffusion samples per evaluation row
    flow_steps: int = 5  # Euler steps of the flow-matching imputers (the diffusion's DDIM uses 5 in research.yaml)
    dedicated_random: int = 8  # dedicated models: singletons + full set + this many random subsets
    # Combinations the *_unseen methods never draw in training (stage 1 is shared and saw them):
    # by default every subset without MRI that has CT or PET (imaging from CT/PET only, +- clinical).
    unseen: list[list[str]] = field(default_factory=lambda: [
        ["ct"], ["pet"], ["ct", "pet"], ["ct", "clinical"], ["pet", "clinical"], ["ct", "pet", "clinical"]])
    n_boot: int = 1000
    threads: int = 2  # torch threads (of each job)
    # Parallel jobs for the method units: after stage 1, `jobs` worker processes (one torch thread
    # each) take the training seeds in turn (seed i -> job i % jobs); the results do not depend on it.
    jobs: int = 2


def load_research_config(path: str = "research", overrides: Optional[list[str]] = None) -> tuple[Config, SweepConfig]:
    """Read a research YAML: the product's sections plus ``sweep``; ``overrides`` as
    ``section.key=value`` (``sweep.n_test=500`` included)."""
    p = resolve_config_path(path)
    with open(p, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections")
    raw = apply_overrides(copy.deepcopy(raw), list(overrides or []))
    sweep_raw = raw.pop("sweep", {}) or {}
    sweep = _build(SweepConfig, sweep_raw, "sweep.")
    bad = sorted(set(sweep.methods) - set(METHODS))
    if bad:
        raise ConfigError(f"sweep.methods {bad} not in {list(METHODS)}")
    if sweep.reference not in sweep.methods:
        raise ConfigError(f"sweep.reference {sweep.reference!r} must be one of sweep.methods {sweep.methods}")
    needs_teacher = {"regressor", "diffusion", "oracle_full", "attention_ttt", "attention_ttt_online",
                     "regressor_head", "diffusion_head", "flow", "tokens_flow",
                     "tokens_regressor", "tokens_mean"} & set(sweep.methods)
    if "regressor_unseen" in sweep.methods and "attention_unseen" not in sweep.methods:
        raise ConfigError("sweep.methods 'regressor_unseen' needs 'attention_unseen' (its teacher) in sweep.methods")
    if needs_teacher and "attention" not in sweep.methods:
        raise ConfigError(f"sweep.methods {sorted(needs_teacher)} need 'attention' (their teacher) in sweep.methods")
    if min(sweep.n_train, sweep.n_val, sweep.n_test) < 2:
        raise ConfigError("sweep.n_train, n_val and n_test must each be >= 2")
    if not sweep.seeds or not sweep.stage1_seeds:
        raise ConfigError("sweep.seeds and sweep.stage1_seeds need at least one seed each")
    cfg = Config.from_dict(raw)
    return cfg, sweep


def sweep_to_dict(sweep: SweepConfig) -> dict[str, Any]:
    return asdict(sweep)
