"""Run configuration: frozen pydantic sections, TOML round trip.

Precedence: defaults < ``--config-file`` (TOML) < command-line options. Every
run writes its resolved configuration (seeds, package versions, device and
backend included) next to its outputs, and that file can be passed back with
``--config-file`` to repeat the run.

Inner rooms (``masking``, ``models``, ``train``, ...) take plain arguments;
only the stage workflows read these sections.
"""

from __future__ import annotations

import platform
import sys
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bids_regionmae.choices import (
    BACKENDS,
    DEVICES,
    FINETUNE_MODES,
    MASK_LEVELS,
    MASK_STRATEGIES,
    OCCLUSION_MODES,
    PATCH_RULES,
    PRECISIONS,
)
from bids_regionmae.errors import InputMissingError, UsageError

#: File name of the resolved configuration written next to a stage's outputs (model directories, comparisons).
CONFIG_FILE_NAME = "regionmae_config.toml"


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def strip_prefix(values: list[str] | tuple[str, ...] | None, prefix: str) -> tuple[str, ...]:
    """Return labels without their BIDS entity prefix (``sub-01`` -> ``01``).

    Parameters
    ----------
    values : sequence of str or None
        Labels as given by the user, with or without the prefix.
    prefix : str
        Entity prefix including the dash, e.g. ``"sub-"``.
    """
    out: list[str] = []
    for value in values or ():
        value = str(value).strip()
        if value.startswith(prefix):
            value = value[len(prefix):]
        if value and value not in out:
            out.append(value)
    return tuple(out)


class InputConfig(_Section):
    """What to read from the fMRIPrep derivatives."""

    participant_label: tuple[str, ...] = ()
    session_label: tuple[str, ...] = ()
    task: tuple[str, ...] = ()
    run: tuple[str, ...] = ()
    space: tuple[str, ...] = ("MNI152NLin6Asym", "MNI152NLin2009cAsym")
    bids_filters: dict[str, dict[str, Any]] = Field(default_factory=dict)
    derivatives: dict[str, str] = Field(default_factory=dict)
    phenotype: str | None = None
    skip_bids_validation: bool = False

    @field_validator("participant_label", mode="before")
    @classmethod
    def _strip_sub(cls, v: Any) -> tuple[str, ...]:
        return strip_prefix(_as_tuple(v), "sub-")

    @field_validator("session_label", mode="before")
    @classmethod
    def _strip_ses(cls, v: Any) -> tuple[str, ...]:
        return strip_prefix(_as_tuple(v), "ses-")

    @field_validator("task", mode="before")
    @classmethod
    def _strip_task(cls, v: Any) -> tuple[str, ...]:
        return strip_prefix(_as_tuple(v), "task-")

    @field_validator("run", mode="before")
    @classmethod
    def _strip_run(cls, v: Any) -> tuple[str, ...]:
        return strip_prefix(_as_tuple(v), "run-")


class AtlasConfig(_Section):
    """Where the AAL3 atlas comes from and how it maps onto patches."""

    atlas_file: str | None = None
    atlas_labels: str | None = None
    patch_rule: Literal[PATCH_RULES] = "majority"


class PreprocessConfig(_Section):
    """Participant-level conversion of BOLD runs to model-ready arrays."""

    target_tr: float | None = None
    clip_length: int = Field(20, ge=1)
    clip_stride: int | None = Field(None, ge=1)
    drop_nonsteady: bool = True
    background_value: float = 0.0


class ModelConfig(_Section):
    """Architecture variant and compute backend."""

    variant: str = "tiny"
    backend: Literal[BACKENDS] = "auto"


class MaskingConfig(_Section):
    """Masking strategy for pretraining."""

    strategy: Literal[MASK_STRATEGIES] = "region"
    regions: tuple[str, ...] = ("cerebellum",)
    mask_ratio: float = Field(0.5, gt=0.0, lt=1.0)
    mask_fraction: float = Field(1.0, gt=0.0, le=1.0)
    level: Literal[MASK_LEVELS] = "token"
    include_background: bool = False
    norm_patch_loss: bool = False

    @field_validator("regions", mode="before")
    @classmethod
    def _split_regions(cls, v: Any) -> tuple[str, ...]:
        items: list[str] = []
        for item in _as_tuple(v):
            items.extend(part.strip() for part in str(item).split(",") if part.strip())
        return tuple(items)


class TrainConfig(_Section):
    """Optimisation settings shared by pretraining and fine-tuning."""

    epochs: int = Field(30, ge=1)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_fraction: float = Field(0.05, ge=0, lt=1)
    val_fraction: float = Field(0.2, ge=0, lt=1)
    checkpoint_every: int = Field(100, ge=1)
    num_workers: int = Field(0, ge=0)
    precision: Literal[PRECISIONS] = "auto"
    resume: bool = True


class FinetuneConfig(_Section):
    """Fine-tuning on a phenotype and its evaluation.

    ``lr`` is the fine-tuning learning rate (heads and prompts learn far
    faster than the pretraining rate ``train.lr``, see :meth:`learning_rate`);
    the other optimisation settings come from the ``train`` section.
    """

    target: str | None = None
    mode: Literal[FINETUNE_MODES] = "linear-probe"
    group_column: str | None = None
    folds: int = Field(5, ge=2)
    lr: float | None = Field(None, gt=0)

    def learning_rate(self, pretrain_lr: float) -> float:
        """``lr`` if set; else 1e-2 for heads and prompts on a frozen encoder, the pretraining rate for ``full``."""
        if self.lr is not None:
            return self.lr
        return pretrain_lr if self.mode == "full" else 1e-2
    patience: int = Field(5, ge=1)
    strategies: tuple[str, ...] = ()

    @field_validator("strategies", mode="before")
    @classmethod
    def _split_strategies(cls, v: Any) -> tuple[str, ...]:
        items: list[str] = []
        for item in _as_tuple(v):
            items.extend(part.strip() for part in str(item).split(",") if part.strip())
        return tuple(items)


class PredictConfig(_Section):
    """Participant-level prediction with a trained model (``participant --model``)."""

    region_error: bool = True
    region_masking: bool = False
    attribution: bool = True
    occlusion_mode: Literal[OCCLUSION_MODES] = "zero"
    occlusion_regions: bool = False
    ig_steps: int = Field(16, ge=1)
    ig_max_clips: int | None = Field(4, ge=1)
    input_space: bool = False


class RunConfig(_Section):
    """The whole resolved configuration of one invocation."""

    bids_dir: str
    output_dir: str
    analysis_level: Literal["participant", "group"]
    stage: Literal["preprocess", "pretrain", "finetune", "compare", "predict"] | None = None
    model_dir: str | None = None
    work_dir: str | None = None
    nprocs: int = Field(1, ge=1)
    omp_nthreads: int | None = Field(None, ge=1)
    seed: int = 0
    device: Literal[DEVICES] = "auto"
    verbose: int = 0
    inputs: InputConfig = Field(default_factory=InputConfig)
    atlas: AtlasConfig = Field(default_factory=AtlasConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    masking: MaskingConfig = Field(default_factory=MaskingConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    predict: PredictConfig = Field(default_factory=PredictConfig)


def _as_tuple(value: Any) -> tuple[Any, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, bytes)):
        return (value,)
    return tuple(value)


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a configuration TOML file, dropping the informational ``[environment]`` table.

    Raises
    ------
    InputMissingError
        The file does not exist.
    UsageError
        The file is not valid TOML.
    """
    path = Path(path)
    if not path.is_file():
        raise InputMissingError(f"--config-file {path}: no such file. Give the path of a TOML file "
                                "such as the regionmae_config.toml written next to earlier outputs.")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"--config-file {path}: not valid TOML ({exc}). Fix the syntax or "
                         "regenerate it from a previous run's regionmae_config.toml.") from exc
    data.pop("environment", None)
    return data


def build_config(cli_values: dict[str, Any], config_file: str | Path | None = None) -> RunConfig:
    """Resolve defaults, the TOML file and command-line values into a :class:`RunConfig`.

    Parameters
    ----------
    cli_values : dict
        Nested mapping of values given on the command line (only those the
        user actually set), using the same section names as :class:`RunConfig`.
    config_file : path, optional
        TOML file whose values are overridden by ``cli_values``.

    Raises
    ------
    UsageError
        A value is invalid; the message names the option and what is allowed.
    """
    data: dict[str, Any] = read_toml(config_file) if config_file else {}
    data = _deep_merge(data, cli_values)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(part) for part in err["loc"])
            problems.append(f"{where}: {err['msg']} (given: {err.get('input')!r})")
        raise UsageError("Invalid configuration:\n  " + "\n  ".join(problems)) from exc


def environment_record(**extra: Any) -> dict[str, Any]:
    """Versions of Python and key packages, plus ``extra`` (device, backend...)."""
    from importlib import metadata

    from bids_regionmae import __version__

    record: dict[str, Any] = {
        "regionmae": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    for package in ("torch", "numpy", "nibabel", "nilearn", "pybids", "templateflow", "mamba-ssm"):
        try:
            record[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            record[package] = "not installed"
    record.update({key: value for key, value in extra.items() if value is not None})
    return record


def config_to_toml(config: RunConfig, environment: dict[str, Any] | None = None) -> str:
    """Serialise ``config`` (and an informational ``[environment]`` table) to TOML text."""
    import tomli_w

    data = config.model_dump(mode="json", exclude_none=True)
    if environment:
        data["environment"] = {k: v for k, v in environment.items() if v is not None}
    return tomli_w.dumps(data)
