"""The training checkpoint on disk: tensors in safetensors, everything else in JSON.

Nothing in a checkpoint is executable: reading one uses :mod:`json` and
:mod:`safetensors` only, so a crafted file can at worst hold wrong numbers
(and the sha256 of the tensor file catches a swapped or altered one).

Layout of ``out_dir/checkpoints/`` (:class:`~bids_regionmae.train.engine.Trainer`)::

    last.json                    the commit record: format, version, the tensor file's name and
                                 sha256, and the state with every tensor replaced by a reference
                                 ({"__tensor__": "model/patch_embed.fc.weight"})
    tensors-<step>.safetensors   the tensors: model, optimizer moments, RNG states (uint8), ...

:func:`write_checkpoint` writes the tensor file under a name no file has yet
(``tensors-00000100.safetensors``; ``tensors-00000100.1.safetensors`` if a
``--no-resume`` run reaches the step of the checkpoint it replaces), then
replaces ``last.json`` atomically (the commit), then deletes the tensor files
of earlier checkpoints. A kill at any moment leaves the previous record with
its tensor file, or the new one; :func:`unreferenced_tensor_files` lists the
leftovers of a write that was killed before its commit.

The JSON half round-trips exactly:

==========================  ==============================================================
value                       in JSON
==========================  ==============================================================
str, int, bool, None        as is
float                       as is; NaN and infinities as ``{"__float__": "nan"}``
tuple                       ``{"__tuple__": [...]}`` (e.g. :func:`random.getstate` needs tuples)
dict with str keys          an object (``{"__dict__": [[key, value], ...]}`` for other keys,
                            e.g. the optimizer's integer parameter ids)
torch.Tensor                ``{"__tensor__": name}``, the tensor in the safetensors file
numpy array                 ``{"__ndarray__": name, "dtype": "<u4", "shape": [624]}``, its bytes
                            as a uint8 tensor (the NumPy RNG state)
numpy scalar                the Python scalar
==========================  ==============================================================

Anything else (a Path, a custom object) is refused when the checkpoint is
written, naming where in the state it sits.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bids_regionmae.atomic import atomic_path, atomic_write_text, sha256_file
from bids_regionmae.errors import CheckpointError

__all__ = [
    "FORMAT",
    "LEGACY_NAME",
    "RECORD_NAME",
    "VERSION",
    "decode_state",
    "encode_state",
    "read_checkpoint",
    "read_record",
    "unreferenced_tensor_files",
    "write_checkpoint",
]

FORMAT = "regionmae-train-checkpoint"
#: 1 was a single ``last.pt`` written with ``torch.save``; it is never read (it could run code)
VERSION = 2
RECORD_NAME = "last.json"
LEGACY_NAME = "last.pt"
TENSOR_GLOB = "tensors-*.safetensors"

_TAGS = ("__float__", "__tuple__", "__dict__", "__tensor__", "__ndarray__")
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


# --------------------------------------------------------------------------- encoding


def encode_state(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state into a JSON-ready tree and the tensors it refers to.

    Parameters
    ----------
    state : nested dict / list / tuple
        Leaves: str, int, float, bool, None, :class:`torch.Tensor`, NumPy
        arrays and scalars.

    Returns
    -------
    tree : JSON-ready object
        ``state`` with tensors and arrays replaced by references (see the module docstring).
    tensors : dict of str to Tensor
        Contiguous CPU copies, named by their place in ``state`` (``"optimizer/state/0/exp_avg"``).

    Raises
    ------
    TypeError
        A leaf of another type, named by its place in ``state``.
    """
    tensors: dict[str, torch.Tensor] = {}

    def store(path: str, tensor: torch.Tensor) -> str:
        name, n = path or "tensor", 1
        while name in tensors:
            name, n = f"{path}#{n}", n + 1
        tensors[name] = tensor.detach().to("cpu", copy=True).contiguous()
        return name

    def enc(value: Any, path: str) -> Any:
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, np.bool_):
            return bool(value)
        if isinstance(value, (int, np.integer)):
            return int(value)
        if isinstance(value, (float, np.floating)):
            value = float(value)
            return value if math.isfinite(value) else {"__float__": repr(value)}
        if isinstance(value, torch.Tensor):
            return {"__tensor__": store(path, value)}
        if isinstance(value, np.ndarray):
            if value.dtype.hasobject:
                raise TypeError(f"{path or '<root>'}: NumPy array of Python objects cannot be stored")
            raw = torch.from_numpy(np.ascontiguousarray(value).reshape(-1).view(np.uint8).copy())
            return {"__ndarray__": store(path, raw), "dtype": value.dtype.str, "shape": list(value.shape)}
        if isinstance(value, tuple):
            return {"__tuple__": [enc(v, f"{path}/{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [enc(v, f"{path}/{i}") for i, v in enumerate(value)]
        if isinstance(value, Mapping):
            if all(isinstance(k, str) for k in value) and not any(k in _TAGS for k in value):
                return {k: enc(v, f"{path}/{k}" if path else k) for k, v in value.items()}
            for k in value:
                if not isinstance(k, (str, int, float, bool, type(None), np.integer)):
                    raise TypeError(f"{path or '<root>'}: a dict key of type {type(k).__name__} cannot be stored")
            return {"__dict__": [[enc(k, path), enc(v, f"{path}/{k}" if path else str(k))] for k, v in value.items()]}
        raise TypeError(f"{path or '<root>'}: a {type(value).__name__} cannot be stored in a training checkpoint "
                        "(use str, int, float, bool, None, lists, tuples, dicts, tensors or NumPy arrays)")

    return enc(state, ""), tensors


def decode_state(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_state`.

    Raises
    ------
    ValueError
        A malformed tree or a reference to a tensor that is not there.
    """

    def tensor(name: Any) -> torch.Tensor:
        if not isinstance(name, str) or name not in tensors:
            raise ValueError(f"reference to a missing tensor {name!r}")
        return tensors[name]

    def dec(value: Any) -> Any:
        if isinstance(value, list):
            return [dec(v) for v in value]
        if not isinstance(value, dict):
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError("bare non-finite number")
            return value
        tag = next((k for k in _TAGS if k in value), None)
        if tag is None:
            return {k: dec(v) for k, v in value.items()}
        body = value[tag]
        if tag == "__float__":
            if body not in _NONFINITE:
                raise ValueError(f"bad number {body!r}")
            return _NONFINITE[body]
        if tag == "__tuple__" and isinstance(body, list):
            return tuple(dec(v) for v in body)
        if tag == "__dict__" and isinstance(body, list) and all(isinstance(p, list) and len(p) == 2 for p in body):
            if not all(p[0] is None or isinstance(p[0], (str, int, float, dict)) for p in body):
                raise ValueError("unusable dict key")
            return {dec(k): dec(v) for k, v in body}
        if tag == "__tensor__":
            return tensor(body)
        if tag == "__ndarray__":
            dtype = np.dtype(value.get("dtype"))
            if dtype.hasobject:
                raise ValueError("array of Python objects")
            raw = tensor(body)
            if raw.dtype != torch.uint8:
                raise ValueError(f"array bytes stored as {raw.dtype}")
            return np.frombuffer(raw.numpy().tobytes(), dtype=dtype).reshape(value.get("shape")).copy()
        raise ValueError(f"malformed {tag} entry")

    return dec(tree)


# --------------------------------------------------------------------------- files


def write_checkpoint(folder: str | Path, state: Mapping[str, Any], step: int) -> Path:
    """Write ``state`` to ``folder`` (tensor file, then the ``last.json`` commit) and drop older tensor files.

    Parameters
    ----------
    folder : path
        The checkpoint folder (created if needed).
    state : mapping
        See :func:`encode_state`.
    step : int
        Goes into the tensor file's name only (an existing file is never overwritten).

    Returns
    -------
    Path
        ``folder / "last.json"``.
    """
    folder = Path(folder)
    tree, tensors = encode_state(dict(state))
    stem, n = f"tensors-{int(step):08d}", 0
    name = f"{stem}.safetensors"
    while (folder / name).exists():  # never touch a file the current record may name
        n += 1
        name = f"{stem}.{n}.safetensors"
    with atomic_path(folder / name) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "version": str(VERSION)})
        digest = sha256_file(tmp)
    record = {"format": FORMAT, "version": VERSION, "tensor_file": name, "tensor_sha256": digest, "state": tree}
    record_path = atomic_write_text(folder / RECORD_NAME, json.dumps(record, indent=1, allow_nan=False) + "\n")
    for old in folder.glob(TENSOR_GLOB):
        if old.name != name:
            with contextlib.suppress(OSError):
                old.unlink()
    return record_path


def read_record(path: str | Path) -> dict[str, Any]:
    """The parsed ``last.json`` at ``path``, checked for format and version (tensors not read).

    Raises
    ------
    CheckpointError
        Unreadable, not JSON, another format or version, or a tensor file name
        that is not a plain ``*.safetensors`` name in the same folder.
    """
    path = Path(path)
    fix = _fix(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse_constant)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read the training checkpoint ({exc}). {fix}") from exc
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a regionmae training checkpoint. {fix}")
    if record.get("version") != VERSION:
        raise CheckpointError(f"{path}: training checkpoint version {record.get('version')!r}, this version of "
                              f"regionmae reads version {VERSION}. {fix}")
    name = record.get("tensor_file")
    if (not isinstance(name, str) or Path(name).name != name or name.startswith(".")
            or not name.endswith(".safetensors")):
        raise CheckpointError(f"{path}: bad tensor file name {name!r} (expected a *.safetensors file next to it). "
                              f"{fix}")
    return record


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read the checkpoint whose commit record is ``path`` (``.../checkpoints/last.json``).

    Returns
    -------
    dict
        The state given to :func:`write_checkpoint`, tensors on the CPU.

    Raises
    ------
    CheckpointError
        See :func:`read_record`; also a missing tensor file, a sha256 that does
        not match the record, or tensors/references that do not fit together.
    """
    path = Path(path)
    record = read_record(path)
    fix = _fix(path)
    tensor_path = path.parent / record["tensor_file"]
    if not tensor_path.is_file():
        raise CheckpointError(f"{path}: its tensor file {tensor_path.name} is missing. {fix}")
    if sha256_file(tensor_path) != record.get("tensor_sha256"):
        raise CheckpointError(f"{tensor_path}: sha256 differs from the one recorded in {path} (a file from "
                              f"another save, or altered). {fix}")
    try:
        tensors = load_file(tensor_path, device="cpu")
        return decode_state(record.get("state"), tensors)
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: unusable training checkpoint ({exc}). {fix}") from exc


def unreferenced_tensor_files(folder: str | Path) -> list[Path]:
    """Tensor files in ``folder`` that ``last.json`` does not name (left by a write killed before its commit).

    With an unreadable ``last.json`` nothing is listed (the files are left for
    the error message to point at); without one, every tensor file is listed.
    """
    folder = Path(folder)
    record_path = folder / RECORD_NAME
    keep: str | None = None
    if record_path.exists():
        try:
            keep = read_record(record_path)["tensor_file"]
        except CheckpointError:
            return []
    return sorted(p for p in folder.glob(TENSOR_GLOB) if p.name != keep)


def _fix(record_path: Path) -> str:
    return f"Rerun with --no-resume to start over (the checkpoint is replaced), or delete {record_path.parent}."


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")
