"""The model directory: the only code that writes or reads ``output_dir/models/<name>/``.

Layout (one for every stage; :class:`ModelDirLayout` names every file)::

    model.safetensors         weights (safetensors: no executable content); the metadata is also in its header
    model.json                typed, versioned metadata (:class:`ModelMeta`), written last
    regionmae_config.toml     resolved configuration of the run that trained it
    data_manifest.json        pretraining: participants, runs, source checksums, split
    masks/masking.json        pretraining: the masking plan and the masker's patch counts
    masks/mask_tokens.npy, masks/mask_voxels.nii.gz   pretraining: the masked patches
    checkpoints/, train_log.csv, val_log.csv, figures/, report.html, ...   written by the stages

``model.json`` (``format_version`` 2) holds, besides what
:func:`bids_regionmae.models.checkpoint.save_model` records (kind, spec,
weights sha256, versions): ``stage`` (``pretrain`` | ``finetune``),
``input_convention`` (how input clips are normalised, see
:data:`bids_regionmae.choices.INPUT_CONVENTIONS`), ``masking`` (the
:class:`~bids_regionmae.masking.plan.MaskingPlan` the encoder was pretrained
with), ``provenance`` (trained here or imported, parent model, seed, steps),
``data`` (participants) and, for fine-tuned models, ``task`` (the head and how
to read its outputs, :class:`TaskHead`); the records, their parsing and the
format-1 migration are in :mod:`bids_regionmae.models.model_record`.

:meth:`ModelDir.open` is the single entry point for ``--model``: a directory
of the current format opens as is; one written before (format 1) goes through
:func:`migrate_v1` or fails with :class:`ModelDirTooOldError`. Checkpoint
files and ``hf://`` addresses are refused for now (:class:`NotAModelDirError`);
an importer for NeuroSTORM checkpoints belongs in :meth:`ModelDir.open`.
Input conventions other than this package's are converted where clips are
read (:class:`bids_regionmae.train.data.ClipDataset`).

Every way a directory can be wrong has its own error (all name the directory
and the fix): :class:`ModelDirMissingError` (exit 66), :class:`NotAModelDirError`
(64), :class:`ModelDirCorruptError` (1), :class:`ModelDirTooNewError` (1),
:class:`ModelDirTooOldError` (1), :class:`WrongModelKindError` (64).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bids_regionmae.atomic import atomic_write_json
from bids_regionmae.choices import DEFAULT_INPUT_CONVENTION, INPUT_CONVENTIONS
from bids_regionmae.errors import InputDataError, InputMissingError, UsageError
from bids_regionmae.masking.plan import MaskingPlan
from bids_regionmae.models.checkpoint import META_NAME, describe_model, load_model, read_model_metadata, save_model
from bids_regionmae.models.model_record import (
    FORMAT_VERSION,
    MODEL_HINT,
    STAGES,
    DataRecord,
    ModelDirCorruptError,
    ModelDirLayout,
    ModelDirMissingError,
    ModelDirTooNewError,
    ModelMeta,
    NotAModelDirError,
    ParentRef,
    Provenance,
    TaskHead,
    WrongModelKindError,
    migrate_v1,
    parse,
    plain,
)
from bids_regionmae.models.spec import ModelSpec

if TYPE_CHECKING:
    from torch import nn

    from bids_regionmae.models.neurostorm import NeuroSTORMEncoder, NeuroSTORMMAE

LOGGER = logging.getLogger(__name__)

__all__ = ["ModelDir"]

# ----------------------------------------------------------------------------- the directory


class ModelDir:
    """A model directory opened (or just saved) with its typed metadata.

    Use :meth:`open` for a directory given by the user and :meth:`save` to
    write one; :attr:`layout` names the other files a stage writes there.

    Attributes
    ----------
    path : Path
    meta : ModelMeta
    """

    def __init__(self, path: Path, meta: ModelMeta):
        self.path = Path(path)
        self.meta = meta
        self.layout = ModelDirLayout(self.path)

    def __repr__(self) -> str:
        return f"ModelDir({str(self.path)!r}, stage={self.meta.stage!r}, variant={self.meta.spec.name!r})"

    # ------------------------------------------------------------------ facts

    @property
    def name(self) -> str:
        """Directory name, e.g. ``pretrain_region-cerebellum_tiny_seed-0``."""
        return self.path.resolve().name

    @property
    def stage(self) -> str:
        return self.meta.stage

    @property
    def spec(self) -> ModelSpec:
        return self.meta.spec

    @property
    def masking(self) -> MaskingPlan | None:
        """The masking plan of the encoder's pretraining (a fine-tuned model's: its parent's)."""
        if self.meta.masking is None and self.parent is not None:
            return self.parent.masking
        return self.meta.masking

    @property
    def task(self) -> TaskHead | None:
        return self.meta.task

    @property
    def weights_sha256(self) -> str | None:
        return self.meta.weights_sha256

    @cached_property
    def parent(self) -> ModelDir | None:
        """The pretrained model a fine-tuned model started from, when it can be found (else None, logged).

        Looked for at the recorded path, then under the same name next to
        this directory (an output folder that was moved); a parent whose
        weights changed since is not used.
        """
        ref = self.meta.provenance.parent
        if ref is None:
            return None
        candidates = [Path(ref.path)] if ref.path else []
        candidates.append(self.path.parent / ref.name)
        for candidate in candidates:
            if not candidate.is_dir():
                continue
            try:
                found = ModelDir.open(candidate)
            except (InputDataError, InputMissingError, UsageError) as exc:
                LOGGER.warning("%s: its pretrained source %s cannot be opened: %s", self.path, candidate, exc)
                return None
            if ref.sha256 and found.weights_sha256 and found.weights_sha256 != ref.sha256:
                LOGGER.warning("%s: the weights of its pretrained source %s changed since fine-tuning; not used",
                               self.path, candidate)
                return None
            return found
        LOGGER.warning("%s: its pretrained source %s was not found", self.path, ref.path or ref.name)
        return None

    def parent_ref(self) -> ParentRef:
        """How a model fine-tuned from this one records it."""
        return ParentRef(name=self.name, path=str(self.path.resolve()), sha256=self.weights_sha256,
                         stage=self.stage)

    # ------------------------------------------------------------------ weights

    def load(self, backend: str = "auto", map_location: str = "cpu") -> nn.Module:
        """The stored module (NeuroSTORMMAE, NeuroSTORMEncoder or FinetuneModel), in eval mode.

        Raises
        ------
        ModelDirCorruptError
            Missing or changed weights file, or weights that do not fit the spec.
        """
        try:
            model, _, _ = load_model(self.path, backend=backend, map_location=map_location)
        except InputMissingError as exc:
            raise ModelDirCorruptError(f"{self.path}: {exc}. The directory is incomplete; re-run the stage "
                                       "that wrote it.") from exc
        except InputDataError as exc:
            raise ModelDirCorruptError(f"{self.path}: {exc}") from exc
        return model

    def load_mae(self, backend: str = "auto") -> NeuroSTORMMAE:
        """The masked autoencoder of a pretraining directory.

        Raises
        ------
        WrongModelKindError
            The directory holds no masked autoencoder (e.g. a fine-tuned model).
        """
        if self.meta.kind != "mae":
            raise WrongModelKindError(f"{self.path}: holds a {self.meta.kind} model ({self.stage}), not a masked "
                                      "autoencoder. Give a directory written by group --stage pretrain.")
        return self.load(backend)  # type: ignore[return-value]

    def load_encoder(self, backend: str = "auto") -> NeuroSTORMEncoder:
        """The encoder, in training mode with gradients on, on the CPU (to fine-tune from)."""
        model = self.load(backend)
        encoder = getattr(model, "encoder", model)
        encoder.train()
        for p in encoder.parameters():
            p.requires_grad_(True)
        return encoder.cpu()

    # ------------------------------------------------------------------ other files

    def read_json(self, path: Path) -> dict[str, Any] | None:
        """A JSON file of the directory (e.g. ``layout.training_summary``); None when absent or unreadable."""
        try:
            value = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def report_files(self) -> dict[str, Path]:
        """Pages, summaries/metrics (JSON) and figures a group report links, by relative name."""
        found: dict[str, Path] = {}
        for path in sorted(self.path.glob("*.html")):
            found[path.name] = path
        for path in sorted(self.path.glob("*.json")):
            if any(word in path.name for word in ("summary", "metrics")) and "fold" not in path.name:
                found[path.name] = path
        for path in sorted(self.layout.figures.glob("*.svg")) + sorted(self.layout.figures.glob("*.png")):
            found[f"figures/{path.name}"] = path
        return found

    def describe(self) -> dict[str, Any]:
        """A short JSON-ready account for sidecars and reports."""
        return {"name": self.name, "stage": self.stage, "variant": self.spec.name,
                "input_convention": self.meta.input_convention, "provenance": plain(self.meta.provenance),
                "masking": self.masking.to_dict() if self.masking else None,
                "task": self.task.to_dict() if self.task else None}

    # ------------------------------------------------------------------ open

    @staticmethod
    def is_saved(path: str | Path) -> bool:
        """Whether ``path`` holds saved weights and metadata (a finished stage)."""
        layout = ModelDirLayout(Path(path))
        return layout.weights.is_file() and layout.metadata.is_file()

    @classmethod
    def open(cls, path: str | Path) -> ModelDir:
        """Open a model directory (``--model``) and check its metadata.

        Raises
        ------
        ModelDirMissingError
            No such directory, or no saved model in it (exit 66).
        NotAModelDirError
            A file or an ``hf://`` address (exit 64).
        ModelDirCorruptError, ModelDirTooNewError, ModelDirTooOldError
            Unusable metadata (exit 1).
        """
        text = str(path)
        if "://" in text:
            raise NotAModelDirError(f"--model {text}: addresses such as hf://... cannot be opened yet. "
                                    + MODEL_HINT)
        root = Path(path)
        if root.is_file():
            raise NotAModelDirError(f"--model {root}: a file; importing checkpoint files (.ckpt, .safetensors) "
                                    "is not supported yet. " + MODEL_HINT)
        if not root.is_dir():
            raise ModelDirMissingError(f"--model {root}: no such directory. " + MODEL_HINT)
        layout = ModelDirLayout(root)
        if not layout.metadata.is_file():
            raise ModelDirMissingError(f"--model {root}: no saved model in it ({META_NAME} missing; the stage that "
                                       "writes it may still be running or have failed). " + MODEL_HINT)
        try:
            raw = read_model_metadata(layout.metadata)
        except InputDataError as exc:
            if "newer" in str(exc):
                raise ModelDirTooNewError(f"--model {root}: {exc}") from exc
            raise ModelDirCorruptError(f"--model {root}: {exc}") from exc
        version = int(raw.get("format_version", 0))
        if version > FORMAT_VERSION:
            raise ModelDirTooNewError(f"--model {root}: written by a newer bids_regionmae (model format {version}, "
                                      f"this version reads up to {FORMAT_VERSION}); upgrade the package.")
        if version < FORMAT_VERSION:
            raw = migrate_v1(raw, layout)
        return cls(root, parse(raw, root))

    # ------------------------------------------------------------------ save

    @classmethod
    def save(cls, path: str | Path, model: nn.Module, *, stage: str, provenance: Provenance, data: DataRecord,
             masking: MaskingPlan | None = None, task: TaskHead | None = None,
             input_convention: str = DEFAULT_INPUT_CONVENTION, extra: Mapping[str, Any] | None = None,
             manifest: Mapping[str, Any] | None = None) -> ModelDir:
        """Write the weights and the metadata of a trained model (and its data manifest).

        Parameters
        ----------
        path : path
            The model directory (created if needed).
        model : nn.Module
            NeuroSTORMMAE, NeuroSTORMEncoder or FinetuneModel.
        stage : {'pretrain', 'finetune'}
        provenance : Provenance
        data : DataRecord
        masking : MaskingPlan, optional
        task : TaskHead, optional
            Required for ``finetune``.
        input_convention : str
        extra : mapping, optional
            JSON-serialisable stage details.
        manifest : mapping, optional
            Written to ``data_manifest.json`` (and named in ``data.manifest``).

        Returns
        -------
        ModelDir
        """
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        if stage == "finetune" and task is None:
            raise ValueError("a fine-tuned model needs its task head")
        if input_convention not in INPUT_CONVENTIONS:
            raise ValueError(f"input_convention must be one of {INPUT_CONVENTIONS}, got {input_convention!r}")
        layout = ModelDirLayout(Path(path))
        if manifest is not None:
            layout.root.mkdir(parents=True, exist_ok=True)
            atomic_write_json(layout.manifest, dict(manifest))
            data = DataRecord(**{**asdict(data), "manifest": layout.manifest.name})
        kind, _ = describe_model(model)
        meta = ModelMeta(stage=stage, kind=kind, spec=model.spec, input_convention=input_convention,
                         masking=masking, provenance=provenance, data=data, task=task, extra=dict(extra or {}))
        save_model(layout.root, model, extra=dict(extra or {}), record=meta.sections())
        return cls.open(layout.root)



