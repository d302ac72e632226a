"""Saving and loading models in a safe format; importing NeuroSTORM checkpoints.

Format (``format_version`` 2; version 1 had no typed sections): a directory
(or a path ending in ``.safetensors``) holding

- ``model.safetensors``: the state dict (no executable content; safe to load from
  untrusted sources), with the JSON metadata also embedded in its header so
  that a lone weights file describes itself;
- ``model.json``: ``kind`` (``mae``/``encoder``/``finetune``), the
  :class:`~bids_regionmae.models.spec.ModelSpec`, the model's constructor
  arguments, package versions, the sha256 of the weights file, the
  caller's ``extra`` dictionary (training config, metrics, ...) and, for a
  model directory, the typed sections of
  :class:`bids_regionmae.models.model_dir.ModelDir` (which owns those).

Both files are written to temporary names and renamed into place (weights
first, JSON last), so a killed job never leaves a truncated file, and the
sha256 in the JSON detects a weights file from another save.

NeuroSTORM's released checkpoints are PyTorch Lightning files: their
``state_dict`` keys carry the Lightning module's attribute prefix (e.g.
``model.``) and ``hyper_parameters`` sit next to it.
:func:`import_neurostorm_checkpoint` reads them with
``torch.load(weights_only=True)`` (tensors and plain containers only), strips the
prefix, renames keys to this package's names and reports what did not match.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import pathlib
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bids_regionmae.atomic import atomic_path, sha256_file
from bids_regionmae.errors import InputDataError, InputMissingError, OutputError
from bids_regionmae.models.heads import FinetuneModel
from bids_regionmae.models.neurostorm import NeuroSTORMEncoder, NeuroSTORMMAE, from_neurostorm_keys
from bids_regionmae.models.registry import create_encoder, create_mae, get_spec
from bids_regionmae.models.spec import ModelSpec, SpecError

logger = logging.getLogger(__name__)

FORMAT_NAME = "bids_regionmae.model"
FORMAT_VERSION = 2
WEIGHTS_NAME = "model.safetensors"
META_NAME = "model.json"
_ANCHOR_KEY = "patch_embed.fc.weight"


# --------------------------------------------------------------------------- helpers


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix == ".safetensors":
        return p, p.with_suffix(".json")
    if p.suffix == ".json":
        return p.with_suffix(".safetensors"), p
    return p / WEIGHTS_NAME, p / META_NAME


def _versions() -> dict[str, str]:
    import safetensors

    from bids_regionmae import __version__

    return {"bids_regionmae": __version__, "torch": torch.__version__,
            "safetensors": getattr(safetensors, "__version__", "unknown"), "python": platform.python_version()}


def describe_model(model: nn.Module) -> tuple[str, dict[str, Any]]:
    """Kind and constructor arguments of a model this module can save.

    Returns
    -------
    kind : {"mae", "encoder", "finetune"}
    config : dict
        JSON-ready arguments needed (besides the spec) to rebuild the model.

    Raises
    ------
    TypeError
        Not a model of this package.
    """
    if isinstance(model, NeuroSTORMMAE):
        return "mae", {}
    if isinstance(model, NeuroSTORMEncoder):
        return "encoder", {"prompt_length": model.prompt_length}
    if isinstance(model, FinetuneModel):
        return "finetune", model.config()
    raise TypeError(f"model: expected NeuroSTORMMAE, NeuroSTORMEncoder or FinetuneModel; "
                    f"got {type(model).__name__}")


def build_model(kind: str, spec: ModelSpec, config: dict[str, Any] | None = None,
                backend: str = "auto") -> nn.Module:
    """Build an untrained model of ``kind`` (inverse of :func:`describe_model`)."""
    config = dict(config or {})
    if kind == "mae":
        return create_mae(spec, backend=backend)
    if kind == "encoder":
        enc = create_encoder(spec, backend=backend)
        if config.get("prompt_length"):
            enc.add_prompts(int(config["prompt_length"]))
        return enc
    if kind == "finetune":
        enc = create_encoder(spec, backend=backend)
        if config.get("prompt_length"):
            enc.add_prompts(int(config["prompt_length"]))
        return FinetuneModel(enc, task=config["task"], num_outputs=int(config["num_outputs"]),
                             mode=config.get("mode", "full"), dropout=float(config.get("dropout", 0.0)))
    raise InputDataError(f"model kind {kind!r} is not one of mae, encoder, finetune")


def _check_json(extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        try:
            json.dumps(value, allow_nan=True)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"extra[{key!r}]: not JSON-serialisable ({type(value).__name__}: {exc}); "
                            f"convert it to str/int/float/list/dict first") from exc


# --------------------------------------------------------------------------- save / load


def save_model(directory_or_path: str | os.PathLike, model: nn.Module, spec: ModelSpec | None = None,
               extra: dict[str, Any] | None = None, *, record: dict[str, Any] | None = None) -> Path:
    """Save ``model`` atomically as safetensors weights + JSON metadata.

    Parameters
    ----------
    directory_or_path : path
        A directory (created if needed; files ``model.safetensors`` and
        ``model.json`` inside) or a path ending in ``.safetensors`` (the JSON
        goes next to it with the same stem).
    model : NeuroSTORMMAE, NeuroSTORMEncoder or FinetuneModel
    spec : ModelSpec, optional
        Defaults to ``model.spec``; must equal it when given.
    extra : dict, optional
        JSON-serialisable information stored with the model (returned by
        :func:`load_model`), e.g. the run configuration and metrics.
    record : dict, optional
        Top-level JSON sections added to the metadata (the typed record of a
        model directory; see :mod:`bids_regionmae.models.model_dir`).

    Returns
    -------
    Path
        The weights file.

    Raises
    ------
    TypeError
        Unsupported model or non-JSON ``extra``.
    SpecError
        ``spec`` differs from ``model.spec``.
    OutputError
        The files cannot be written.
    """
    from safetensors.torch import save_file

    kind, config = describe_model(model)
    model_spec: ModelSpec = model.spec
    if spec is None:
        spec = model_spec
    elif spec != model_spec:
        raise SpecError(f"save_model: spec {spec.name!r} differs from the model's spec {model_spec.name!r}: "
                        f"{spec.to_dict()} != {model_spec.to_dict()}")
    extra = dict(extra or {})
    _check_json(extra)
    _check_json(dict(record or {}))
    weights_path, meta_path = _paths(directory_or_path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "model_config": config,
        "spec": spec.to_dict(),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "versions": _versions(),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "extra": extra,
        **dict(record or {}),
    }
    try:
        weights_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(weights_path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT_NAME, "meta": json.dumps(meta)})
            digest = sha256_file(tmp)
        meta["weights"] = {"file": weights_path.name, "sha256": digest}
        with atomic_path(meta_path) as tmp:
            tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"{weights_path}: cannot write the model ({exc})") from exc
    return weights_path


def read_model_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Metadata of a saved model (the JSON file, or the header of a lone weights file).

    Raises
    ------
    InputMissingError
        Neither file exists.
    InputDataError
        The metadata is unreadable or of an unknown format.
    """
    weights_path, meta_path = _paths(path)
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputDataError(f"{meta_path}: unreadable model metadata ({exc})") from exc
    elif weights_path.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(weights_path), framework="pt") as fh:
                header = fh.metadata() or {}
            meta = json.loads(header["meta"])
        except Exception as exc:
            raise InputDataError(f"{weights_path}: not a bids_regionmae model file ({exc}); "
                                 f"expected {META_NAME} next to it") from exc
    else:
        raise InputMissingError(f"{path}: no saved model here (expected {WEIGHTS_NAME} and {META_NAME})")
    if meta.get("format") != FORMAT_NAME:
        raise InputDataError(f"{path}: format {meta.get('format')!r} is not {FORMAT_NAME!r}")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise InputDataError(f"{path}: model format version {meta['format_version']} is newer than this "
                             f"bids_regionmae supports ({FORMAT_VERSION}); upgrade the package")
    return meta


def load_model(path: str | os.PathLike, backend: str = "auto",
               map_location: str | torch.device = "cpu") -> tuple[nn.Module, ModelSpec, dict[str, Any]]:
    """Load a model written by :func:`save_model`.

    Parameters
    ----------
    path : path
        The directory, the ``.safetensors`` file or the ``.json`` file.
    backend : {"auto", "mamba-ssm", "torch"}
        Selective-scan backend of the rebuilt model.
    map_location : str or torch.device
        Device of the loaded weights.

    Returns
    -------
    model : nn.Module
        NeuroSTORMMAE, NeuroSTORMEncoder or FinetuneModel, in eval mode.
    spec : ModelSpec
    extra : dict

    Raises
    ------
    InputMissingError
        Nothing saved at ``path``.
    InputDataError
        Corrupt or mismatched files (sha256, keys, shapes).
    """
    from safetensors.torch import load_file

    meta = read_model_metadata(path)
    weights_path, _ = _paths(path)
    if not weights_path.is_file():
        raise InputMissingError(f"{weights_path}: weights file missing (metadata found)")
    expected = (meta.get("weights") or {}).get("sha256")
    if expected and sha256_file(weights_path) != expected:
        raise InputDataError(f"{weights_path}: sha256 differs from {META_NAME}; the two files come from "
                             f"different saves")
    try:
        spec = ModelSpec.from_dict(meta["spec"])
    except (KeyError, TypeError, SpecError) as exc:
        raise InputDataError(f"{path}: invalid model spec in metadata ({exc})") from exc
    model = build_model(meta.get("kind", "mae"), spec, meta.get("model_config"), backend=backend)
    try:
        state = load_file(str(weights_path), device=str(map_location))
    except Exception as exc:
        raise InputDataError(f"{weights_path}: unreadable safetensors file ({exc})") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InputDataError(f"{weights_path}: weights do not fit model {spec.name!r} ({exc})") from exc
    model.to(map_location)
    model.eval()
    return model, spec, dict(meta.get("extra") or {})


# --------------------------------------------------------------------------- NeuroSTORM import


@dataclass
class ImportReport:
    """What :func:`import_neurostorm_checkpoint` matched.

    Attributes
    ----------
    prefix : str
        Prefix stripped from the checkpoint keys (e.g. ``"model."``).
    loaded : list of str
        Keys (this package's names) returned in the state dict.
    missing : list of str
        Model keys the checkpoint lacks (they keep their initial values).
    unexpected : list of str
        Checkpoint keys the model does not have (e.g. a task head, ``atlas_map``).
    mismatched : list of str
        Keys present in both with different shapes, ``"key: ckpt -> model"``.
    hyper_parameters : dict
        The Lightning ``hyper_parameters`` (empty if absent).
    """

    prefix: str = ""
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    hyper_parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """No missing, unexpected or mismatched keys."""
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        """One-line account of the import."""
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f", ... (+{len(keys) - 5})" if len(keys) > 5 else "")

        parts = [f"{len(self.loaded)} tensors loaded (prefix {self.prefix!r})"]
        for name in ("missing", "unexpected", "mismatched"):
            keys = getattr(self, name)
            if keys:
                parts.append(f"{len(keys)} {name}: {few(keys)}")
        return "; ".join(parts)


_SAFE_EXTRA_GLOBALS = [argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath]


def _torch_load_weights_only(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(_SAFE_EXTRA_GLOBALS):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch refuses other objects with errors of several types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputDataError(
            f"{path}: cannot be read with torch.load(weights_only=True): {first}. The file holds Python "
            "objects other than tensors and plain containers, and this package never loads those (loading them "
            "can run arbitrary code). If you trust its source, load it in full once in a separate Python session, "
            "save only its weights with torch.save({'state_dict': ckpt['state_dict']}, 'weights_only.ckpt') "
            "and import that file."
        ) from exc


def _find_state_dict(ckpt: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(ckpt, dict):
        for key in ("state_dict", "model_state_dict", "model", "module"):
            value = ckpt.get(key)
            if isinstance(value, dict) and any(torch.is_tensor(v) for v in value.values()):
                return value
        if ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
            return ckpt
    raise InputDataError(f"{path}: no state_dict found (expected a Lightning checkpoint with a 'state_dict' "
                         f"entry or a plain dict of tensors)")


def import_neurostorm_checkpoint(
    ckpt_path: str | os.PathLike,
    spec: ModelSpec | str = "neurostorm",
    *,
    strict: bool = False,
    return_report: bool = False,
) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], ImportReport]:
    """Read NeuroSTORM weights (Lightning ``.ckpt`` or plain state dict) for :class:`NeuroSTORMMAE`.

    Parameters
    ----------
    ckpt_path : path
        Checkpoint file; loaded with ``torch.load(weights_only=True)``.
    spec : ModelSpec or str
        Target architecture (default ``"neurostorm"``).
    strict : bool
        Raise unless every key matches in name and shape.
    return_report : bool
        Also return an :class:`ImportReport`.

    Returns
    -------
    state_dict : dict of str to Tensor
        Entries that fit ``NeuroSTORMMAE(spec)`` by name and shape, under this
        package's names; load with ``mae.load_state_dict(sd, strict=False)``.
        Encoder-only checkpoints also fit ``mae.encoder`` after removing the
        ``encoder.`` prefix.
    report : ImportReport
        Only with ``return_report=True``. Missing/unexpected/mismatched keys
        are also logged as a warning.

    Raises
    ------
    InputMissingError
        No such file.
    InputDataError
        Not loadable with ``weights_only=True``, no recognisable NeuroSTORM
        weights, or (with ``strict``) keys that do not match.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise InputMissingError(f"{path}: NeuroSTORM checkpoint not found")
    if isinstance(spec, str):
        spec = get_spec(spec)
    ckpt = _torch_load_weights_only(path)
    raw = _find_state_dict(ckpt, path)
    hparams = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if isinstance(hparams, argparse.Namespace):
        hparams = vars(hparams)
    anchors = [k for k in raw if k.endswith(_ANCHOR_KEY)]
    if not anchors:
        raise InputDataError(f"{path}: no '{_ANCHOR_KEY}' among {len(raw)} keys; not a NeuroSTORM model")
    prefix = min(anchors, key=len)[: -len(_ANCHOR_KEY)]
    report = ImportReport(prefix=prefix, hyper_parameters=dict(hparams) if isinstance(hparams, dict) else {})
    stripped = {}
    for key, value in raw.items():
        if key.startswith(prefix):
            stripped[key[len(prefix):]] = value
        else:
            report.unexpected.append(key)
    mapped = from_neurostorm_keys(stripped)
    with torch.device("meta"):
        target = {k: v.shape for k, v in create_mae(spec, backend="torch").state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in mapped.items():
        if key not in target:
            report.unexpected.append(prefix + (key[len("encoder."):] if key.startswith("encoder.") else key))
        elif tuple(value.shape) != tuple(target[key]):
            report.mismatched.append(f"{key}: {tuple(value.shape)} -> {tuple(target[key])}")
        else:
            out[key] = value
    report.loaded = list(out)
    report.missing = [k for k in target if k not in mapped]
    for name in ("img_size", "embed_dim", "depths", "patch_size", "window_size"):
        if name in report.hyper_parameters:
            theirs = report.hyper_parameters[name]
            ours = getattr(spec, name)
            try:
                differs = tuple(theirs) != tuple(ours) if not isinstance(ours, int) else int(theirs) != ours
            except (TypeError, ValueError):
                differs = False
            if differs:
                report.mismatched.append(f"hyper_parameters.{name}: {theirs!r} -> {ours!r}")
    if not report.ok:
        msg = f"{path}: NeuroSTORM import into {spec.name!r}: {report.summary()}"
        if strict:
            raise InputDataError(msg)
        logger.warning(msg)
    else:
        logger.info("%s: NeuroSTORM import: %s", path, report.summary())
    return (out, report) if return_report else out


def load_neurostorm_mae(ckpt_path: str | os.PathLike, spec: ModelSpec | str = "neurostorm",
                        backend: str = "auto", strict: bool = False) -> tuple[NeuroSTORMMAE, ImportReport]:
    """Build ``NeuroSTORMMAE(spec)`` and fill it from a NeuroSTORM checkpoint.

    Returns
    -------
    mae : NeuroSTORMMAE
    report : ImportReport
    """
    state, report = import_neurostorm_checkpoint(ckpt_path, spec, strict=strict, return_report=True)
    mae = create_mae(spec, backend=backend)
    mae.load_state_dict(state, strict=False)
    return mae, report


__all__ = [
    "FORMAT_VERSION", "ImportReport", "build_model", "describe_model", "import_neurostorm_checkpoint",
    "load_model", "load_neurostorm_mae", "read_model_metadata", "save_model",
]
