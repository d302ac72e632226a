"""MNI templates through TemplateFlow, with a clear error when offline.

TemplateFlow keeps its files under ``TEMPLATEFLOW_HOME`` (default
``~/.cache/templateflow``) and downloads a missing one from S3 on first use.
On a compute node without internet that download fails within a second
(``requests.ConnectionError``); :func:`get_template` turns it into an
:class:`~bids_regionmae.errors.OfflineError` that names the file and says how
to pre-fetch it.

``templateflow`` is imported inside the functions: importing it reads
``TEMPLATEFLOW_HOME`` and may unpack its skeleton there.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Literal

from bids_regionmae.errors import OfflineError, UsageError

#: Template spaces this app reads inputs in.
TEMPLATE_SPACES: tuple[str, ...] = ("MNI152NLin6Asym", "MNI152NLin2009cAsym")
TemplateKind = Literal["T1w", "mask"]
#: TemplateFlow query per kind.
TEMPLATE_KINDS: dict[str, dict[str, Any]] = {
    "T1w": {"suffix": "T1w", "desc": None},
    "mask": {"suffix": "mask", "desc": "brain"},
}

_CLIENTS: dict[Path, Any] = {}


def templateflow_home() -> Path:
    """The TemplateFlow folder in effect: ``$TEMPLATEFLOW_HOME`` or TemplateFlow's default."""
    env = os.environ.get("TEMPLATEFLOW_HOME")
    if env:
        return Path(env).absolute()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("templateflow")).absolute()


def template_filename(space: str, kind: str = "T1w", resolution: int = 2) -> str:
    """TemplateFlow's relative path of a template file (e.g. for messages)."""
    query = TEMPLATE_KINDS[kind]
    desc = f"_desc-{query['desc']}" if query["desc"] else ""
    return f"tpl-{space}/tpl-{space}_res-{int(resolution):02d}{desc}_{query['suffix']}.nii.gz"


def prefetch_command(space: str, kind: str = "T1w", resolution: int = 2) -> str:
    """The shell command that downloads one template file into ``TEMPLATEFLOW_HOME``."""
    query = TEMPLATE_KINDS[kind]
    desc = f"desc='{query['desc']}'" if query["desc"] else "desc=None"
    return (f"TEMPLATEFLOW_HOME={templateflow_home()} python -c \"from templateflow.api import get; "
            f"get('{space}', resolution={int(resolution)}, {desc}, suffix='{query['suffix']}')\"")


def _client(home: Path) -> Any:
    """``templateflow.api`` if it serves ``home``, else a client bound to ``home``.

    TemplateFlow reads ``TEMPLATEFLOW_HOME`` once, at import; a client per
    folder keeps later changes of the variable (tests, config files) honoured.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # "Populating a new TemplateFlow stub"
        from templateflow import api, conf
        from templateflow.client import TemplateFlowClient

    if Path(conf.TF_HOME).absolute() == home:
        return api
    if home not in _CLIENTS:
        _CLIENTS[home] = TemplateFlowClient(root=home)
    return _CLIENTS[home]


def _offline_error(space: str, kind: str, resolution: int, home: Path, reason: str) -> OfflineError:
    name = template_filename(space, kind, resolution)
    return OfflineError(
        f"TemplateFlow file {name} ({space} {kind}, res-{int(resolution):02d}) is not in "
        f"TEMPLATEFLOW_HOME={home} and could not be downloaded: {reason}. "
        f"Pre-fetch it on a machine with internet access: {prefetch_command(space, kind, resolution)} "
        f"then copy that folder to this machine and set TEMPLATEFLOW_HOME to it "
        f"(or run the container image, which ships the templates).")


def _is_network_error(exc: BaseException) -> bool:
    try:
        import requests
    except ImportError:  # pragma: no cover - requests is a templateflow dependency
        return isinstance(exc, OSError)
    return isinstance(exc, (requests.RequestException, OSError, RuntimeError))


def _update_skeleton(client: Any) -> None:
    """Add TemplateFlow's skeleton from the wheel to the client's home (local, no overwrite)."""
    from templateflow import api, conf

    if client is api:
        conf.update(local=True, overwrite=False, silent=True)
    else:
        client.cache.update(local=True, overwrite=False, silent=True)


def _query(client: Any, space: str, resolution: int, query: dict[str, Any]) -> list[Path]:
    found = client.get(space, resolution=resolution, extension=".nii.gz", **query)
    if isinstance(found, (list, tuple)):
        return [Path(p) for p in found]
    return [Path(found)]


def get_template(space: str = "MNI152NLin6Asym", kind: TemplateKind = "T1w", resolution: int = 2) -> Path:
    """Path of a template file, fetched through ``templateflow.api.get``.

    Parameters
    ----------
    space : {'MNI152NLin6Asym', 'MNI152NLin2009cAsym'}
        Template identifier.
    kind : {'T1w', 'mask'}
        ``T1w``: the T1-weighted template; ``mask``: its ``desc-brain`` mask.
    resolution : int
        TemplateFlow resolution index (2 = 2 mm for both spaces).

    Returns
    -------
    Path
        An existing, non-empty ``.nii.gz`` under ``TEMPLATEFLOW_HOME``.

    Raises
    ------
    UsageError
        Unknown ``space`` or ``kind``.
    OfflineError
        The file is not in ``TEMPLATEFLOW_HOME`` and cannot be downloaded;
        the message says how to pre-fetch it.
    """
    if space not in TEMPLATE_SPACES:
        raise UsageError(f"space must be one of {TEMPLATE_SPACES}, got {space!r}")
    if kind not in TEMPLATE_KINDS:
        raise UsageError(f"kind must be one of {tuple(TEMPLATE_KINDS)}, got {kind!r}")
    home = templateflow_home()
    query = TEMPLATE_KINDS[kind]
    try:
        client = _client(home)
        found = _query(client, space, resolution, query)
        if not found:
            # A pre-populated home may lack TemplateFlow's skeleton (the empty
            # placeholders it indexes); add it from the copy in the wheel
            # (no network, never overwrites), then ask again.
            _update_skeleton(client)
            found = _query(client, space, resolution, query)
    except Exception as exc:
        if _is_network_error(exc):
            raise _offline_error(space, kind, resolution, home, f"{type(exc).__name__}: {exc}") from exc
        raise
    found = [p for p in found if p.is_file() and p.stat().st_size > 0]
    if not found:
        raise _offline_error(space, kind, resolution, home, "TemplateFlow returned no file")
    return found[0]
