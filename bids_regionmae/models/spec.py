"""Model specification: every number that fixes a NeuroSTORM-style architecture.

A :class:`ModelSpec` is frozen, hashable, JSON-serialisable
(:meth:`ModelSpec.to_dict` / :meth:`ModelSpec.from_dict`) and validated on
construction: every size that must divide another is checked and a
:class:`SpecError` names the field, the value and what must divide it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from bids_regionmae.errors import UsageError


class SpecError(UsageError, ValueError):
    """An invalid model specification or input shape (exit 64; also a ``ValueError``)."""


def _tuple(value: Any, n: int | None, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        value = (value,) * (n or 1)
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{name}: expected a sequence of integers; got {value!r}") from exc
    if n is not None and len(out) != n:
        raise SpecError(f"{name}: expected {n} integers; got {len(out)} ({value!r})")
    if any(v <= 0 for v in out):
        raise SpecError(f"{name}: every entry must be positive; got {out}")
    return out


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of a shifted-window Mamba encoder and its MAE decoder.

    Parameters
    ----------
    name : str
        Variant name (``"neurostorm"``, ``"tiny"``, ...).
    img_size : tuple of 4 int
        Input volume (X, Y, Z, T): voxels and frames.
    in_chans : int
        Input channels (1 for BOLD).
    patch_size : tuple of 4 int
        Patch (px, py, pz, pt) embedded into one token; ``pt`` must be 1
        (time is never downsampled).
    embed_dim : int
        Width C0 of the first stage; stage s has ``C0 * 2**s`` channels.
    depths : tuple of int
        Blocks per encoder stage; stages after the first start with a 2x2x2
        spatial patch merging.
    window_size : tuple of 4 int
        Scanning window (d, h, w, t) of stages 1.. and of the decoder.
    first_window_size : tuple of 4 int
        Scanning window of the first stage.
    last_layer_full : bool
        Last encoder stage scans one window covering its whole spatial grid
        (x ``window_size[3]`` frames), without shifting.
    decoder_depths : tuple of int, optional
        Blocks per decoder stage (widths C_{S-2}, ..., C0); defaults to
        ``depths[:-1]`` reversed.
    mlp_ratio : float
        Hidden width of the block MLPs relative to C.
    d_state, d_conv, expand : int
        Mamba state size, causal-convolution width and inner expansion.
    drop_path_rate : float
        Maximum stochastic-depth rate (linearly increasing over encoder blocks).
    """

    name: str = "custom"
    img_size: tuple[int, int, int, int] = (96, 96, 96, 20)
    in_chans: int = 1
    patch_size: tuple[int, int, int, int] = (6, 6, 6, 1)
    embed_dim: int = 36
    depths: tuple[int, ...] = (2, 2, 6, 2)
    window_size: tuple[int, int, int, int] = (4, 4, 4, 4)
    first_window_size: tuple[int, int, int, int] = (4, 4, 4, 4)
    last_layer_full: bool = True
    decoder_depths: tuple[int, ...] | None = None
    mlp_ratio: float = 4.0
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    drop_path_rate: float = 0.0
    c_multiplier: int = field(default=2, repr=False)

    def __post_init__(self) -> None:
        setf = object.__setattr__
        setf(self, "name", str(self.name))
        setf(self, "img_size", _tuple(self.img_size, 4, "img_size"))
        setf(self, "patch_size", _tuple(self.patch_size, 4, "patch_size"))
        setf(self, "depths", _tuple(self.depths, None, "depths"))
        setf(self, "window_size", _tuple(self.window_size, 4, "window_size"))
        setf(self, "first_window_size", _tuple(self.first_window_size, 4, "first_window_size"))
        for key in ("in_chans", "embed_dim", "d_state", "d_conv", "expand", "c_multiplier"):
            value = getattr(self, key)
            if isinstance(value, bool) or int(value) != value or int(value) <= 0:
                raise SpecError(f"{key}: expected a positive integer; got {value!r}")
            setf(self, key, int(value))
        setf(self, "mlp_ratio", float(self.mlp_ratio))
        setf(self, "drop_path_rate", float(self.drop_path_rate))
        setf(self, "last_layer_full", bool(self.last_layer_full))
        if self.decoder_depths is None:
            setf(self, "decoder_depths", tuple(reversed(self.depths[:-1])))
        else:
            setf(self, "decoder_depths", _tuple(self.decoder_depths, None, "decoder_depths"))
        self._validate()

    # ------------------------------------------------------------------ validation

    def _validate(self) -> None:
        if self.c_multiplier != 2:
            raise SpecError(f"c_multiplier: only 2 is supported (patch merging doubles the width); "
                            f"got {self.c_multiplier}")
        if self.patch_size[3] != 1:
            raise SpecError(f"patch_size: the temporal patch size must be 1 (time is never "
                            f"downsampled); got {self.patch_size}")
        if len(self.depths) < 2:
            raise SpecError(f"depths: at least two stages are required (the decoder mirrors stages 2..S); "
                            f"got {self.depths}")
        if len(self.decoder_depths) != len(self.depths) - 1:
            raise SpecError(f"decoder_depths: expected {len(self.depths) - 1} stages (one fewer than "
                            f"depths={self.depths}); got {self.decoder_depths}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise SpecError(f"drop_path_rate: expected a value in [0, 1); got {self.drop_path_rate}")
        if self.mlp_ratio <= 0:
            raise SpecError(f"mlp_ratio: expected a positive number; got {self.mlp_ratio}")
        for axis, (n, p) in enumerate(zip(self.img_size, self.patch_size, strict=True)):
            if n % p:
                raise SpecError(
                    f"img_size {self.img_size}: axis {'XYZT'[axis]} ({n}) is not divisible by "
                    f"patch_size[{axis}] ({p}); choose an input size that is a multiple of the patch size")
        grid = self.token_grid
        factor = 2 ** (self.num_stages - 1)
        for axis in range(3):
            if grid[axis] % factor:
                raise SpecError(
                    f"img_size {self.img_size}: token grid {grid} axis {'DHW'[axis]} ({grid[axis]}) must be "
                    f"divisible by 2**(stages-1) = {factor} for {self.num_stages} stages; the input axis must "
                    f"be a multiple of patch_size*{factor} = {self.patch_size[axis] * factor}")
        for s, g in enumerate(self.stage_grids):
            win, _ = self.stage_window(s)
            self._check_window(f"encoder stage {s}", g, win)
        for s, g in enumerate(self.decoder_grids):
            win, _ = self.decoder_window(s)
            self._check_window(f"decoder stage {s}", g, win)

    def _check_window(self, where: str, grid: tuple[int, ...], win: tuple[int, ...]) -> None:
        for axis, (g, w) in enumerate(zip(grid, win, strict=True)):
            if g % w:
                raise SpecError(
                    f"img_size {self.img_size}: {where} has token grid {grid} whose axis {'DHWT'[axis]} ({g}) "
                    f"is not divisible by its scanning window {win} ({w}); change img_size or window_size")

    # ------------------------------------------------------------------ derived sizes

    @property
    def num_stages(self) -> int:
        """Number of encoder stages S."""
        return len(self.depths)

    @property
    def token_grid(self) -> tuple[int, int, int, int]:
        """Token grid (D, H, W, T) after patch embedding."""
        return tuple(n // p for n, p in zip(self.img_size, self.patch_size, strict=True))  # type: ignore[return-value]

    @property
    def num_tokens(self) -> int:
        """Tokens per input after patch embedding (D*H*W*T)."""
        return math.prod(self.token_grid)

    @property
    def patch_dim(self) -> int:
        """Values per patch (px*py*pz*pt*in_chans)."""
        return math.prod(self.patch_size) * self.in_chans

    @property
    def stage_dims(self) -> tuple[int, ...]:
        """Channels of every encoder stage (C0, 2 C0, ...)."""
        return tuple(self.embed_dim * self.c_multiplier ** s for s in range(self.num_stages))

    @property
    def num_features(self) -> int:
        """Channels of the encoder output (last stage)."""
        return self.stage_dims[-1]

    @property
    def stage_grids(self) -> tuple[tuple[int, int, int, int], ...]:
        """Token grid (d, h, w, T) seen by every encoder stage."""
        D, H, W, T = self.token_grid
        return tuple((D >> s, H >> s, W >> s, T) for s in range(self.num_stages))

    @property
    def output_grid(self) -> tuple[int, int, int, int]:
        """Grid (d, h, w, T) of the encoder output."""
        return self.stage_grids[-1]

    @property
    def decoder_dims(self) -> tuple[int, ...]:
        """Channels of every decoder stage (C_{S-2}, ..., C0)."""
        return tuple(reversed(self.stage_dims[:-1]))

    @property
    def decoder_grids(self) -> tuple[tuple[int, int, int, int], ...]:
        """Token grid of every decoder stage."""
        return tuple(reversed(self.stage_grids[:-1]))

    @staticmethod
    def _clip(grid: tuple[int, ...], window: tuple[int, ...], shift: bool) -> tuple[tuple[int, ...],
                                                                                     tuple[int, ...]]:
        # a window as large as the grid covers it, and shifting it is pointless
        win = tuple(min(g, w) for g, w in zip(grid, window, strict=True))
        sh = tuple((w // 2 if (shift and g > w) else 0) for g, w in zip(grid, window, strict=True))
        return win, sh

    def stage_window(self, stage: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Scanning window and shift of odd blocks in encoder ``stage``.

        Returns
        -------
        window : tuple of 4 int
            Window (d, h, w, t) actually used (clipped to the grid).
        shift : tuple of 4 int
            Roll applied before odd blocks (0 where the window covers the axis).
        """
        grid = self.stage_grids[stage]
        if stage == self.num_stages - 1 and self.last_layer_full and self.num_stages > 1:
            return self._clip(grid, grid[:3] + (self.window_size[3],), shift=False)
        window = self.first_window_size if stage == 0 else self.window_size
        return self._clip(grid, window, shift=True)

    def decoder_window(self, stage: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Scanning window and odd-block shift of decoder ``stage`` (see :meth:`stage_window`)."""
        return self._clip(self.decoder_grids[stage], self.window_size, shift=True)

    # ------------------------------------------------------------------ (de)serialisation

    def replace(self, **changes: Any) -> ModelSpec:
        """Copy with some fields changed (validated again)."""
        if "depths" in changes and "decoder_depths" not in changes:
            changes["decoder_depths"] = None
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (tuples as lists) that :meth:`from_dict` reads back."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        """Build a spec from :meth:`to_dict` output.

        Raises
        ------
        SpecError
            Unknown keys or invalid values.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"model spec: unknown field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)
