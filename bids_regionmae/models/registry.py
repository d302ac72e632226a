"""Named model variants (timm style) and factories.

>>> from bids_regionmae.models import create_mae, get_spec, list_variants
>>> list_variants()
['neurostorm', 'small', 'tiny']
>>> mae = create_mae("tiny")                     # doctest: +SKIP
>>> spec = get_spec("neurostorm", depths=(2, 2, 2, 2))

Variants
--------
``neurostorm``
    NeuroSTORM's default pretraining configuration, exactly: input
    96x96x96x20, patches 6x6x6x1, widths 36/72/144/288, depths 2/2/6/2,
    4x4x4x4 windows, full-grid last stage; encoder 5,173,020 parameters,
    MAE 7,712,964.
``small``
    Same input and windows, half the width (embed 18) and depths 1/1/3/1:
    a quick GPU smoke-test model for the full 96^3 grid.
``tiny``
    CPU test/demo model: input 48x48x48x8, patches 6x6x6x1 (token grid
    8x8x8x8), widths 16/32, depths 2/2, decoder depth 2; 89,416 parameters.
    A training step at batch 2 takes 1-2 s on 2 CPU cores.
"""

from __future__ import annotations

import difflib

from bids_regionmae.errors import UsageError
from bids_regionmae.models.neurostorm import NeuroSTORMEncoder, NeuroSTORMMAE
from bids_regionmae.models.spec import ModelSpec, SpecError

_VARIANTS: dict[str, ModelSpec] = {}


def register_variant(spec: ModelSpec, overwrite: bool = False) -> ModelSpec:
    """Add ``spec`` to the registry under ``spec.name``.

    Raises
    ------
    UsageError
        The name is taken and ``overwrite`` is False.
    """
    if spec.name in _VARIANTS and not overwrite:
        raise UsageError(f"model variant {spec.name!r} is already registered")
    _VARIANTS[spec.name] = spec
    return spec


register_variant(ModelSpec(name="neurostorm"))
register_variant(ModelSpec(name="small", embed_dim=18, depths=(1, 1, 3, 1)))
register_variant(ModelSpec(name="tiny", img_size=(48, 48, 48, 8), embed_dim=16, depths=(2, 2)))


def list_variants() -> list[str]:
    """Names of the registered variants, sorted."""
    return sorted(_VARIANTS)


def get_spec(name: str, /, **overrides) -> ModelSpec:
    """Specification of a named variant, optionally with fields changed.

    Parameters
    ----------
    name : str
        A name from :func:`list_variants`.
    **overrides
        :class:`ModelSpec` fields to change, e.g. ``img_size=(96, 96, 96, 40)``.
        Changing ``depths`` resets ``decoder_depths`` to its default unless given.

    Returns
    -------
    ModelSpec

    Raises
    ------
    UsageError
        Unknown variant (with close matches) or unknown field.
    SpecError
        The changed spec is invalid (e.g. an input size the patches/windows do not divide).
    """
    if name not in _VARIANTS:
        close = difflib.get_close_matches(str(name), list(_VARIANTS), n=3, cutoff=0.4)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise UsageError(f"model: unknown variant {name!r}{hint} (available: {', '.join(list_variants())})")
    spec = _VARIANTS[name]
    if not overrides:
        return spec
    known = set(spec.to_dict())
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise SpecError(f"model spec: unknown field(s) {unknown} for variant {name!r}; "
                        f"known fields: {sorted(known)}")
    return spec.replace(**overrides)


def _as_spec(spec_or_name: ModelSpec | str) -> ModelSpec:
    if isinstance(spec_or_name, ModelSpec):
        return spec_or_name
    if isinstance(spec_or_name, dict):
        return ModelSpec.from_dict(spec_or_name)
    return get_spec(spec_or_name)


def create_mae(spec_or_name: ModelSpec | str = "neurostorm", backend: str = "auto") -> NeuroSTORMMAE:
    """Build a masked autoencoder (randomly initialised; seed with ``torch.manual_seed``).

    Parameters
    ----------
    spec_or_name : ModelSpec or str
        A spec or a variant name.
    backend : {"auto", "mamba-ssm", "torch"}
        Selective-scan backend (see :func:`bids_regionmae.models.mamba.resolve_backend`).

    Returns
    -------
    NeuroSTORMMAE
        ``recon = mae(x, token_mask)`` with x (B, Cin, X, Y, Z, T) and token_mask
        (B, D, H, W, T) bool or None; ``mae.encoder``; ``mae.spec``.

    Raises
    ------
    UsageError
        Unknown variant or backend.
    BackendError
        ``backend="mamba-ssm"`` but mamba_ssm does not import.
    """
    return NeuroSTORMMAE(_as_spec(spec_or_name), backend=backend)


def create_encoder(spec_or_name: ModelSpec | str = "neurostorm", backend: str = "auto") -> NeuroSTORMEncoder:
    """Build a stand-alone encoder (see :func:`create_mae` for the arguments).

    Returns
    -------
    NeuroSTORMEncoder
        ``encoder(x) -> (B, C_last, d, h, w, T)``; ``encoder.embed(x) -> (B, C_last)``.
    """
    return NeuroSTORMEncoder(_as_spec(spec_or_name), backend=backend)
