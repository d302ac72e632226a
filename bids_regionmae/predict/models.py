"""The model a prediction runs with: a pretrained MAE directory or a fine-tuned model directory.

:func:`load_prediction_model` reads a model directory written by group level
(``--stage pretrain`` or ``--stage finetune``) through
:func:`bids_regionmae.models.checkpoint.load_model` and wraps what prediction
needs into a :class:`PredictionModel`:

- ``embed``: clips -> pooled encoder embeddings;
- ``classify``: clips (and optional token masks) -> logits / regression outputs
  (fine-tuned models);
- ``mae``: the masked autoencoder for per-region reconstruction error (a
  pretrained directory, or the pretrained source a fine-tuned directory
  records).
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bids_regionmae.errors import InputMissingError, UsageError
from bids_regionmae.predict.naming import model_label

LOGGER = logging.getLogger(__name__)

__all__ = ["PredictionModel", "load_prediction_model", "output_names"]

#: Keys of the fine-tuned model's metadata that may name its pretrained source directory.
_SOURCE_KEYS = ("pretrained_dir", "pretrained_model_dir", "pretrained", "source_model_dir", "source_dir",
                "init_from", "pretrained_from")
_METADATA_FILES = ("finetune_metadata.json", "model_metadata.json", "metadata.json", "training_summary.json")


@dataclass
class PredictionModel:
    """Everything prediction needs from a model directory.

    Attributes
    ----------
    label : str
        Alphanumeric model label for the ``desc-`` entity.
    kind : {'pretrained', 'finetuned'}
    spec : ModelSpec
        Input size ``img_size`` (X, Y, Z, T) and ``patch_size``.
    embed : callable
        ``embed(x (B, 1, X, Y, Z, T)) -> (B, C)``.
    classify : callable or None
        ``classify(x (B, 1, X, Y, Z, T), token_mask (B, D, H, W, T) or None) -> (B, K)``.
    mae : nn.Module or None
        ``mae(x, token_mask) -> (B, 1, X, Y, Z, T)``.
    task_kind : {'binary', 'multiclass', 'regression'} or None
    class_names : list of str or None
        For classification; for binary tasks index 1 is the positive class.
    target : str or None
        Phenotype column the model predicts.
    token_masks : bool
        ``classify`` accepts token masks (mask-token occlusion possible).
    patch_rule : str
        Patch rule of region membership used in pretraining.
    model_dir, mae_dir : Path or None
    metadata : dict
    modules : list of nn.Module
        Modules to move to a device / put in eval mode.
    output_scale : tuple of float or None
        ``(mean, std)`` to map regression outputs back to the target's units.
    """

    label: str
    kind: str
    spec: Any
    embed: Callable[[torch.Tensor], torch.Tensor]
    classify: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None
    mae: nn.Module | None = None
    task_kind: str | None = None
    class_names: list[str] | None = None
    target: str | None = None
    token_masks: bool = False
    patch_rule: str = "majority"
    model_dir: Path | None = None
    mae_dir: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    modules: list[nn.Module] = field(default_factory=list)
    output_scale: tuple[float, float] | None = None
    example_group: str | None = None
    masking: dict[str, Any] | None = None

    def masking_text(self) -> str | None:
        """A short description of the MAE's pretraining masks, for the methods text."""
        m = self.masking or {}
        strategy = m.get("strategy")
        if strategy == "region":
            region = m.get("region") or f"{len(m.get('labels') or [])} AAL3 labels"
            return f"region-aware masking of {region} (patch rule {m.get('rule', 'majority')})"
        if strategy == "random":
            return f"random tube masking, ratio {m.get('ratio')}"
        if strategy == "random-region":
            return f"random whole-region masking, ratio {m.get('ratio')}"
        return None

    def to(self, device: torch.device | str) -> PredictionModel:
        """Move the modules to ``device`` and put them in eval mode."""
        for module in self.modules:
            module.to(device)
            module.eval()
        return self

    def describe(self) -> dict[str, Any]:
        """JSON-ready description for sidecars and reports."""
        return {
            "Label": self.label,
            "Kind": self.kind,
            "Directory": str(self.model_dir) if self.model_dir else None,
            "Variant": getattr(self.spec, "name", None),
            "InputSize": list(getattr(self.spec, "img_size", []) or []),
            "Target": self.target,
            "TaskKind": self.task_kind,
            "ClassNames": self.class_names,
            "ReconstructionModel": str(self.mae_dir) if self.mae_dir else None,
            "PatchRule": self.patch_rule,
            "Masking": self.masking_text(),
        }


def output_names(model: PredictionModel, n_outputs: int) -> list[str]:
    """Names of the output columns: class names, or ``prediction`` for regression.

    Binary models with one logit get the positive class name (or ``positive``).
    """
    if model.task_kind == "regression" or (model.task_kind is None and n_outputs == 1 and not model.class_names):
        return ["prediction"] if n_outputs == 1 else [f"output{i}" for i in range(n_outputs)]
    names = [str(c) for c in (model.class_names or [])]
    if n_outputs == 1:
        return [names[1] if len(names) == 2 else "positive"]
    if len(names) == n_outputs:
        return names
    return [f"class{i}" for i in range(n_outputs)]


# ----------------------------------------------------------------------------- loading


def _read_metadata(model_dir: Path, extra: Mapping[str, Any] | None) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for name in _METADATA_FILES:
        path = model_dir / name
        if path.is_file():
            try:
                content = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(content, dict):
                for key, value in content.items():
                    meta.setdefault(key, value)
    return {**meta, **dict(extra or {})}


def _masking_record(directory: Path, extra: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The pretraining masker: ``masks/masking.json`` of a pretraining directory, else the checkpoint's ``masking``."""
    path = directory / "masks" / "masking.json"
    if path.is_file():
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(content, dict):
                return content
        except (OSError, ValueError):
            pass
    value = (extra or {}).get("masking")
    return dict(value) if isinstance(value, Mapping) else None


def _find(meta: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if key in meta and meta[key] not in (None, ""):
            return meta[key]
    for value in meta.values():
        if isinstance(value, Mapping):
            found = _find(value, *keys)
            if found is not None:
                return found
    return None


def _accepts_token_mask(module: nn.Module) -> bool:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return "token_mask" in params or len([p for p in params.values()
                                          if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]) >= 2


def _embed_fn(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    for owner in (model, getattr(model, "encoder", None)):
        if owner is not None and hasattr(owner, "embed"):
            return owner.embed
    encoder = getattr(model, "encoder", None)
    if encoder is not None:
        return lambda x: encoder(x).mean(dim=(2, 3, 4, 5))
    raise UsageError(f"{type(model).__name__} has neither embed() nor an encoder: cannot compute embeddings")


def _load_mae(directory: Path, backend: str) -> tuple[nn.Module, Any, dict[str, Any]]:
    from bids_regionmae.models.checkpoint import load_model

    model, spec, extra = _call_load(load_model, directory, backend)
    if not hasattr(model, "forward_decoder"):
        raise UsageError(f"{directory}: holds a {type(model).__name__}, not a masked autoencoder")
    return model, spec, dict(extra or {})


def _call_load(load_model: Callable[..., Any], directory: Path, backend: str) -> tuple[Any, Any, Any]:
    params = inspect.signature(load_model).parameters
    kwargs: dict[str, Any] = {}
    if "backend" in params:
        kwargs["backend"] = backend
    if "map_location" in params:
        kwargs["map_location"] = "cpu"
    return load_model(directory, **kwargs)


def _resolve_source(value: Any, model_dir: Path) -> Path | None:
    if not value:
        return None
    path = Path(str(value))
    candidates = [path] if path.is_absolute() else [model_dir / path, model_dir.parent / path, model_dir.parent /
                                                   path.name]
    if path.is_absolute():
        candidates.append(model_dir.parent / path.name)  # moved output_dir
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return None


def _example_group(masking: Mapping[str, Any] | None) -> str | None:
    from bids_regionmae.atlas.regions import LOBE_GROUPS

    labels = set(int(v) for v in (masking or {}).get("labels") or [])
    if not labels:
        return None
    best = max(LOBE_GROUPS, key=lambda g: len(labels & set(LOBE_GROUPS[g])))
    return best if labels & set(LOBE_GROUPS[best]) else None


def load_prediction_model(model_dir: str | Path, *, backend: str = "auto",
                          mae_dir: str | Path | None = None) -> PredictionModel:
    """Load a pretrained or fine-tuned model directory for prediction.

    Parameters
    ----------
    model_dir : path
        ``output_dir/models/<name>`` written by group level.
    backend : {'auto', 'mamba-ssm', 'torch'}
    mae_dir : path, optional
        MAE for the reconstruction error of a fine-tuned model (default: the
        pretrained source its metadata records, when it still exists).

    Returns
    -------
    PredictionModel
        On the CPU, in eval mode.

    Raises
    ------
    InputMissingError
        ``model_dir`` does not exist (exit 66).
    UsageError
        It holds no loadable model.
    """
    from bids_regionmae.models.checkpoint import load_model

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InputMissingError(f"--model {model_dir}: no such directory. Give a model directory written by "
                                "group level, e.g. <output_dir>/models/pretrain_region-cerebellum_tiny_seed-0")
    try:
        model, spec, extra = _call_load(load_model, model_dir, backend)
    except InputMissingError as exc:
        raise InputMissingError(f"--model {model_dir}: no saved model in it ({exc}). Give a directory written by "
                                "group --stage pretrain or --stage finetune (output_dir/models/<name>).") from exc
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as exc:
        raise UsageError(f"--model {model_dir}: cannot load a model from it ({type(exc).__name__}: {exc}). "
                         "Give a directory written by --stage pretrain or --stage finetune.") from exc
    meta = _read_metadata(model_dir, extra)
    label = model_label(model_dir, meta)
    masking = _masking_record(model_dir, meta)
    if hasattr(model, "forward_decoder"):  # a masked autoencoder
        model.eval()
        return PredictionModel(label=label, kind="pretrained", spec=spec, embed=model.encoder.embed, mae=model,
                               patch_rule=str((masking or {}).get("rule") or "majority"), model_dir=model_dir,
                               mae_dir=model_dir, metadata=meta, modules=[model],
                               example_group=_example_group(masking), masking=dict(masking or {}) or None)
    model.eval()
    modules: list[nn.Module] = [model]
    task_kind = _find(meta, "task_kind", "task")
    class_names = _find(meta, "class_names", "classes")
    target = _find(meta, "target", "target_column")
    scale = _find(meta, "target_scale", "target_normalization", "target_stats")
    output_scale = None
    if isinstance(scale, Mapping) and {"mean", "std"} <= set(scale):
        output_scale = (float(scale["mean"]), float(scale["std"]))
    elif _find(meta, "target_mean") is not None and _find(meta, "target_sd", "target_std") is not None:
        output_scale = (float(_find(meta, "target_mean")), float(_find(meta, "target_sd", "target_std")))
    source = _resolve_source(mae_dir or _find(meta, *_SOURCE_KEYS), model_dir)
    mae = None
    mae_masking = None
    if source is not None:
        try:
            mae, _, mae_extra = _load_mae(source, backend)
            mae.eval()
            modules.append(mae)
            mae_masking = _masking_record(source, mae_extra)
        except Exception as exc:  # noqa: BLE001 - the rest of the prediction still works
            LOGGER.warning("%s: could not load the pretrained MAE %s for the reconstruction error: %s",
                           model_dir, source, exc)
            source = None
    elif mae_dir or _find(meta, *_SOURCE_KEYS):
        LOGGER.warning("%s: its pretrained source %s was not found; no reconstruction error", model_dir,
                       mae_dir or _find(meta, *_SOURCE_KEYS))
    rule = (mae_masking or masking or {}).get("rule") or "majority"
    classify, token_masks = _classifier(model, mae)
    return PredictionModel(label=label, kind="finetuned", spec=spec, embed=_embed_fn(model), classify=classify,
                           mae=mae, task_kind=str(task_kind) if task_kind else None,
                           class_names=[str(c) for c in class_names] if class_names else None,
                           target=str(target) if target else None, token_masks=token_masks, patch_rule=str(rule),
                           model_dir=model_dir, mae_dir=source, metadata=meta, modules=modules,
                           output_scale=output_scale, example_group=_example_group(mae_masking),
                           masking=dict(mae_masking or {}) or None)


def _classifier(model: nn.Module, mae: nn.Module | None
                ) -> tuple[Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor], bool]:
    """``classify(x, token_mask)`` of a fine-tuned model, and whether it honours token masks.

    A :class:`~bids_regionmae.models.heads.FinetuneModel` is run as
    ``head(mean_pool(encoder.forward_tokens(x, token_mask, mask_token)))``:
    gradients reach the input whatever the fine-tuning mode (its ``embed``
    runs a linear-probe encoder without autograd), and masked tokens are
    replaced by the pretrained MAE's mask token when that MAE is loaded.
    Other modules are called as ``model(x)``.
    """
    encoder = getattr(model, "encoder", None)
    head = getattr(model, "head", None)
    if encoder is not None and head is not None and hasattr(encoder, "forward_tokens"):
        from bids_regionmae.models.heads import mean_pool

        mask_token = getattr(mae, "mask_token", None) if mae is not None else None

        def classify(x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
            if token_mask is not None and mask_token is None:
                raise UsageError("mask-token occlusion needs the pretrained MAE's mask token; use zero occlusion")
            tokens = encoder.forward_tokens(x, token_mask, mask_token if token_mask is not None else None)
            out = head(mean_pool(tokens))
            return out if out.dim() == 2 else out.reshape(out.shape[0], -1)

        return classify, mask_token is not None

    token_masks = _accepts_token_mask(model)

    def call(x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = model(x, token_mask) if token_mask is not None else model(x)
        if isinstance(out, Mapping):
            out = out.get("logits", next(iter(out.values())))
        return out if out.dim() == 2 else out.reshape(out.shape[0], -1)

    return call, token_masks
