"""The typed, versioned record of a model directory (``model.json``): records, parsing, migration, errors.

:class:`ModelMeta` holds the sections :class:`~bids_regionmae.models.model_dir.ModelDir`
writes: ``stage``, ``input_convention``, ``masking`` (a
:class:`~bids_regionmae.masking.plan.MaskingPlan`), ``provenance``
(:class:`Provenance`, with the :class:`ParentRef` of a fine-tuned model),
``data`` (:class:`DataRecord`) and ``task`` (:class:`TaskHead`). :func:`parse`
reads a version-2 record; :func:`migrate_v1` turns a format-1 record (the
stage facts in ``extra``, the masking in ``masks/masking.json``) into one,
or raises :class:`ModelDirTooOldError`. One error class per way a directory
can be wrong.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from bids_regionmae.choices import DEFAULT_INPUT_CONVENTION, INPUT_CONVENTIONS
from bids_regionmae.config import CONFIG_FILE_NAME
from bids_regionmae.errors import InputDataError, InputMissingError, UsageError
from bids_regionmae.masking.plan import MaskingPlan
from bids_regionmae.models.checkpoint import META_NAME, WEIGHTS_NAME
from bids_regionmae.models.spec import ModelSpec, SpecError

__all__ = [
    "FORMAT_VERSION",
    "SOURCES",
    "STAGES",
    "DataRecord",
    "ModelDirCorruptError",
    "ModelDirLayout",
    "ModelDirMissingError",
    "ModelDirTooNewError",
    "ModelDirTooOldError",
    "ModelMeta",
    "NotAModelDirError",
    "ParentRef",
    "Provenance",
    "TaskHead",
    "WrongModelKindError",
    "migrate_v1",
    "parse",
]

#: Version of ``model.json`` this module writes (1: before the typed sections).
FORMAT_VERSION = 2
#: Stages that write model directories.
STAGES: tuple[str, ...] = ("pretrain", "finetune")
#: Where the weights come from.
SOURCES: tuple[str, ...] = ("pretrained-here", "finetuned-here", "imported")
MODEL_HINT = ("Give a directory written by group level: output_dir/models/pretrain_... (--stage pretrain) "
               "or output_dir/models/finetune_... (--stage finetune).")


# ----------------------------------------------------------------------------- errors


class ModelDirMissingError(InputMissingError):
    """The path does not exist, or holds no saved model (exit 66)."""


class NotAModelDirError(UsageError):
    """The path is a file or an address, not a model directory (exit 64)."""


class ModelDirCorruptError(InputDataError):
    """The metadata is unreadable, or the weights do not match it (exit 1)."""


class ModelDirTooNewError(InputDataError):
    """Written by a newer bids_regionmae (exit 1)."""


class ModelDirTooOldError(InputDataError):
    """Written by an older bids_regionmae and it lacks what this version needs (exit 1)."""


class WrongModelKindError(UsageError):
    """The directory holds another kind of model than the stage needs (exit 64)."""


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class ParentRef:
    """The model a fine-tuned model started from.

    Attributes
    ----------
    name : str
        Directory name of the parent.
    path : str or None
        Its absolute path when the child was trained.
    sha256 : str or None
        sha256 of the parent's weights.
    stage : str or None
    """

    name: str
    path: str | None = None
    sha256: str | None = None
    stage: str | None = None


@dataclass(frozen=True)
class Provenance:
    """Where the weights come from.

    Attributes
    ----------
    source : {'pretrained-here', 'finetuned-here', 'imported'}
    parent : ParentRef or None
        Fine-tuned models: the pretrained model they started from (None: a random encoder).
    seed : int or None
    steps : int or None
        Optimizer steps of the training that produced the weights.
    """

    source: str
    parent: ParentRef | None = None
    seed: int | None = None
    steps: int | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"provenance source must be one of {SOURCES}, got {self.source!r}")


@dataclass(frozen=True)
class DataRecord:
    """The participants a model was trained on.

    Attributes
    ----------
    train_participants, val_participants : tuple of str
    manifest : str or None
        File of the directory with the full data manifest (``data_manifest.json``).
    labels_source : str or None
        Fine-tuned models: the table the labels came from.
    """

    train_participants: tuple[str, ...] = ()
    val_participants: tuple[str, ...] = ()
    manifest: str | None = None
    labels_source: str | None = None


@dataclass(frozen=True)
class TaskHead:
    """The task head of a fine-tuned model and how to read its outputs.

    Attributes
    ----------
    kind : {'binary', 'multiclass', 'regression'}
    target : str
        Phenotype column.
    class_names : tuple of str
        Index order; binary: index 1 is the positive class; empty for regression.
    mode : {'linear-probe', 'prompt', 'full'}
    target_mean, target_sd : float or None
        Regression: value = output * target_sd + target_mean.

    Notes
    -----
    Outputs: binary, one logit (P(positive) = sigmoid, positive when the
    logit >= 0); multiclass, logits (softmax, argmax); regression, a
    standardised value. Clip outputs of a participant are averaged first
    (``aggregation = "mean_clip_logits"``).
    """

    kind: str
    target: str
    class_names: tuple[str, ...] = ()
    mode: str = "linear-probe"
    target_mean: float | None = None
    target_sd: float | None = None

    @property
    def num_outputs(self) -> int:
        """Outputs of the head: 1 (binary, regression) or the number of classes."""
        return len(self.class_names) if self.kind == "multiclass" else 1

    @property
    def positive_class(self) -> str | None:
        return self.class_names[1] if self.kind == "binary" else None

    @property
    def output(self) -> str:
        return {"binary": "logit", "multiclass": "logits"}.get(self.kind, "standardized_value")

    @property
    def output_scale(self) -> tuple[float, float] | None:
        """``(mean, sd)`` mapping regression outputs to the target's units."""
        if self.target_mean is None or self.target_sd is None:
            return None
        return float(self.target_mean), float(self.target_sd)

    def to_dict(self) -> dict[str, Any]:
        """Fields plus the derived reading rules (``output``, ``decision_threshold``, ``aggregation``...)."""
        return {**plain(self), "num_outputs": self.num_outputs, "positive_class": self.positive_class,
                "output": self.output, "decision_threshold": 0.0 if self.kind == "binary" else None,
                "aggregation": "mean_clip_logits"}


@dataclass(frozen=True)
class ModelMeta:
    """The typed metadata of a model directory (``model.json``).

    Attributes
    ----------
    stage : {'pretrain', 'finetune'}
    kind : {'mae', 'encoder', 'finetune'}
        The stored module.
    spec : ModelSpec
    input_convention : str
        One of :data:`bids_regionmae.choices.INPUT_CONVENTIONS`.
    masking : MaskingPlan or None
        The plan the encoder was pretrained with (None when unknown, e.g. from scratch).
    provenance : Provenance
    data : DataRecord
    task : TaskHead or None
        Fine-tuned models only.
    weights_sha256 : str or None
    extra : dict
        Stage-specific details (cross-validation summary, masker patch counts...).
    format_version : int
        The version the directory was written with (1: migrated).
    """

    stage: str
    kind: str
    spec: ModelSpec
    input_convention: str
    masking: MaskingPlan | None
    provenance: Provenance
    data: DataRecord
    task: TaskHead | None = None
    weights_sha256: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def sections(self) -> dict[str, Any]:
        """The typed sections as written into ``model.json``."""
        return {"stage": self.stage, "input_convention": self.input_convention,
                "masking": self.masking.to_dict() if self.masking else None,
                "provenance": plain(self.provenance), "data": plain(self.data),
                "task": self.task.to_dict() if self.task else None}


def plain(record: Any) -> dict[str, Any]:
    """JSON-ready dict of a record dataclass (tuples as lists)."""
    return json.loads(json.dumps(asdict(record)))


def _record(cls: type, data: Mapping[str, Any] | None) -> Any:
    """Build a record dataclass from JSON, ignoring keys it does not have."""
    if data is None:
        return None
    names = {f.name for f in fields(cls)}
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in names}
    return cls(**values)


# ----------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class ModelDirLayout:
    """Paths of every file of a model directory."""

    root: Path

    @property
    def weights(self) -> Path:
        return self.root / WEIGHTS_NAME

    @property
    def metadata(self) -> Path:
        return self.root / META_NAME

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE_NAME

    @property
    def manifest(self) -> Path:
        return self.root / "data_manifest.json"

    @property
    def masks(self) -> Path:
        return self.root / "masks"

    @property
    def masking_record(self) -> Path:
        return self.masks / "masking.json"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def training_summary(self) -> Path:
        return self.root / "training_summary.json"

    @property
    def region_mse(self) -> Path:
        return self.root / "region_mse.tsv"


# ----------------------------------------------------------------------------- parse / migrate


def parse(raw: Mapping[str, Any], root: Path) -> ModelMeta:
    """:class:`ModelMeta` from a version-2 ``model.json``."""
    try:
        spec = ModelSpec.from_dict(raw["spec"])
        stage = str(raw["stage"])
        if stage not in STAGES:
            raise ValueError(f"stage {stage!r} is not one of {STAGES}")
        convention = str(raw.get("input_convention") or "")
        if convention not in INPUT_CONVENTIONS:
            raise ValueError(f"input convention {convention!r} is not one this version reads ({INPUT_CONVENTIONS})")
        masking = MaskingPlan.from_dict(raw["masking"]) if raw.get("masking") else None
        prov = dict(raw.get("provenance") or {})
        provenance = Provenance(source=str(prov.get("source")), parent=_record(ParentRef, prov.get("parent")),
                                seed=prov.get("seed"), steps=prov.get("steps"))
        data = _record(DataRecord, raw.get("data") or {})
        task = _record(TaskHead, raw.get("task"))
    except (KeyError, TypeError, ValueError, SpecError, UsageError) as exc:
        raise ModelDirCorruptError(f"--model {root}: invalid metadata in {META_NAME} ({type(exc).__name__}: {exc}). "
                                   "Re-run the stage that wrote it.") from exc
    return ModelMeta(stage=stage, kind=str(raw.get("kind", "mae")), spec=spec, input_convention=convention,
                     masking=masking, provenance=provenance, data=data, task=task,
                     weights_sha256=(raw.get("weights") or {}).get("sha256"), extra=dict(raw.get("extra") or {}),
                     format_version=int(raw.get("format_version", FORMAT_VERSION)))


def _v1_masking(layout: ModelDirLayout, extra: Mapping[str, Any]) -> dict[str, Any] | None:
    """The masking plan of a format-1 pretraining directory (``masks/masking.json``, else the masker record)."""
    record = None
    if layout.masking_record.is_file():
        try:
            record = json.loads(layout.masking_record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = None
    record = record if isinstance(record, Mapping) else extra.get("masking")
    if not isinstance(record, Mapping) or not record.get("strategy"):
        return None
    plan = {"strategy": record["strategy"], "region": record.get("region"), "labels": record.get("labels") or [],
            "rule": record.get("rule") or "majority", "level": record.get("level") or "token",
            "include_background": bool(record.get("include_background", False)),
            "norm_patch_loss": bool(record.get("norm_patch_loss", False))}
    for key, default in (("ratio", 0.5), ("fraction", 1.0)):
        plan[key] = record.get(key) if record.get(key) is not None else default
    return plan


def _v1_manifest_participants(layout: ModelDirLayout) -> dict[str, list[str]]:
    try:
        manifest = json.loads(layout.manifest.read_text(encoding="utf-8"))
        return dict(manifest.get("participants") or {})
    except (OSError, ValueError, AttributeError):
        return {}


def migrate_v1(raw: Mapping[str, Any], layout: ModelDirLayout) -> dict[str, Any]:
    """The version-2 form of a ``model.json`` written in format 1 (before the typed sections).

    Format 1 kept the stage facts in ``extra`` (and the masking plan of a
    pretraining directory in ``masks/masking.json``); they are moved into
    the typed sections. Every format-1 model used the ``regionmae-global``
    input convention.

    Raises
    ------
    ModelDirTooOldError
        The record lacks the stage, or a fine-tuned model its task.
    """
    extra = dict(raw.get("extra") or {})
    stage = extra.get("stage")
    where = f"--model {layout.root}"
    if stage not in STAGES:
        raise ModelDirTooOldError(f"{where}: written by an older version of bids_regionmae (model format "
                                  f"{raw.get('format_version')}) without a 'stage' record, so it cannot be used. "
                                  "Re-run group level (--stage pretrain or --stage finetune) to write it again.")
    out = {k: v for k, v in raw.items() if k != "extra"}  # format_version stays: it tells that it was migrated
    out["input_convention"] = DEFAULT_INPUT_CONVENTION
    out["extra"] = extra
    if stage == "pretrain":
        people = _v1_manifest_participants(layout)
        out.update(stage="pretrain", masking=_v1_masking(layout, extra), task=None,
                   provenance={"source": "pretrained-here", "parent": None, "seed": extra.get("seed"),
                               "steps": extra.get("steps")},
                   data={"train_participants": people.get("train") or [],
                         "val_participants": people.get("validation") or [],
                         "manifest": layout.manifest.name if layout.manifest.is_file() else None})
        return out
    if not extra.get("task_kind") or not extra.get("target"):
        raise ModelDirTooOldError(f"{where}: written by an older version of bids_regionmae (model format "
                                  f"{raw.get('format_version')}): a fine-tuned model without its task record. "
                                  "Re-run group --stage finetune to write it again.")
    parent = None
    if extra.get("pretrained_dir") or (extra.get("pretrained_name") not in (None, "scratch")):
        parent = {"name": extra.get("pretrained_name") or Path(str(extra.get("pretrained_dir"))).name,
                  "path": extra.get("pretrained_dir"), "sha256": None, "stage": extra.get("pretrained_stage")}
    out.update(stage="finetune", masking=None,
               task={"kind": extra["task_kind"], "target": extra["target"],
                     "class_names": list(extra.get("class_names") or []), "mode": extra.get("mode") or "linear-probe",
                     "target_mean": extra.get("target_mean"), "target_sd": extra.get("target_sd")},
               provenance={"source": "finetuned-here", "parent": parent, "seed": extra.get("seed"), "steps": None},
               data={"train_participants": list(extra.get("train_participants") or []),
                     "val_participants": list(extra.get("val_participants") or []),
                     "labels_source": extra.get("labels_source")})
    return out

