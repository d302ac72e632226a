"""NeuroSTORM-style shifted-window Mamba (SWM) encoder and masked autoencoder.

Architecture (numbers for the default ``neurostorm`` variant, see
:mod:`bids_regionmae.models.registry`):

- patch embedding: non-overlapping 6x6x6x1 patches of the (B, 1, 96, 96, 96, 20)
  input, flattened in (px, py, pz, pt, channel) order, ``Linear(216 -> 36)``
  (``patch_embed.fc``), giving a 16x16x16x20 token grid;
- masked tokens (a boolean mask on the token grid) are replaced by a learnable
  mask token right after patch embedding (SimMIM style), so compute does not
  depend on the mask ratio;
- four stages of widths 36/72/144/288 and depths 2/2/6/2; each stage first adds
  its learnable ``pos_embed`` (1, C, d, h, w, 1) and ``time_embed``
  (1, C, 1, 1, 1, T), then runs its blocks; stages 0-2 end with a 2x2x2
  spatial patch merging (``LayerNorm(8C)`` + ``Linear(8C -> 2C, bias=False)``);
- block: ``x + Mamba(windows(LN(x)))`` then ``x + MLP(LN(x))`` (GELU, 4C).
  Tokens of each 4x4x4x4 window form one Mamba sequence of 256 tokens in
  (d, h, w, t) order, time fastest; odd blocks first roll the grid by half a
  window ("shifted scanning"); a window at least as large as the grid covers
  it and is not shifted along that axis. The last stage scans its whole
  2x2x2 grid x 4 frames (32 tokens) without shifting.
- decoder (MAE only): patch expanding ``Linear(C -> 4C, bias=False)`` into
  2x2x2 positions of C/2 channels + ``LayerNorm(C/2)``; SWM stages of widths
  144/72/36 and depths 6/2/2 (expanding after the first two); ``norm_up``;
  ``decoder_pred`` ``Linear(36 -> 216)`` back to voxels. No skip connections.

Tensors inside the network are channels-last, (B, d, h, w, T, C); the public
encoder output is channels-first (B, C, d, h, w, T) as in NeuroSTORM.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from bids_regionmae.models.mamba import Mamba, check_backend_available
from bids_regionmae.models.spec import ModelSpec, SpecError

#: Prefix of encoder parameters inside :class:`NeuroSTORMMAE`'s state dict.
#: NeuroSTORM's own MAE stores them without a prefix; see
#: :func:`to_neurostorm_keys` / :func:`from_neurostorm_keys`.
ENCODER_PREFIX = "encoder."
_ENCODER_ROOTS = ("patch_embed.", "pos_embeds.", "layers.")


# --------------------------------------------------------------------------- windows


def window_partition(x: torch.Tensor, window: tuple[int, ...], seq_first: bool) -> torch.Tensor:
    """Cut a token grid into scanning windows.

    Parameters
    ----------
    x : Tensor, shape (B, D, H, W, T, C)
    window : tuple of 4 int
        Window (wd, wh, ww, wt); must divide (D, H, W, T).
    seq_first : bool
        Return (L, Bw, C) instead of (Bw, L, C).

    Returns
    -------
    Tensor, shape (Bw, L, C) or (L, Bw, C)
        ``L = wd*wh*ww*wt`` tokens per window in (d, h, w, t) order (time
        fastest); windows ordered (B, D/wd, H/wh, W/ww, T/wt).
    """
    B, D, H, W, T, C = x.shape
    wd, wh, ww, wt = window
    x = x.view(B, D // wd, wd, H // wh, wh, W // ww, ww, T // wt, wt, C)
    L = wd * wh * ww * wt
    if seq_first:
        return x.permute(2, 4, 6, 8, 0, 1, 3, 5, 7, 9).reshape(L, -1, C)
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6, 8, 9).reshape(-1, L, C)


def window_reverse(windows: torch.Tensor, window: tuple[int, ...], grid: tuple[int, ...],
                   seq_first: bool) -> torch.Tensor:
    """Inverse of :func:`window_partition`.

    Parameters
    ----------
    windows : Tensor, shape (Bw, L, C) or (L, Bw, C)
    window : tuple of 4 int
    grid : tuple (B, D, H, W, T)
    seq_first : bool
        Layout of ``windows``.

    Returns
    -------
    Tensor, shape (B, D, H, W, T, C)
    """
    B, D, H, W, T = grid
    wd, wh, ww, wt = window
    C = windows.shape[-1]
    nd, nh, nw, nt = D // wd, H // wh, W // ww, T // wt
    if seq_first:
        x = windows.view(wd, wh, ww, wt, B, nd, nh, nw, nt, C).permute(4, 5, 0, 6, 1, 7, 2, 8, 3, 9)
    else:
        x = windows.view(B, nd, nh, nw, nt, wd, wh, ww, wt, C).permute(0, 1, 5, 2, 6, 3, 7, 4, 8, 9)
    return x.reshape(B, D, H, W, T, C)


def patchify(x: torch.Tensor, patch_size: tuple[int, ...]) -> torch.Tensor:
    """Cut volumes into patch vectors, in the order :class:`PatchEmbed` feeds its ``fc``.

    Parameters
    ----------
    x : Tensor, shape (B, Cin, X, Y, Z, T)
    patch_size : tuple (px, py, pz, pt)

    Returns
    -------
    Tensor, shape (B, D, H, W, T', px*py*pz*pt*Cin)
        Token grid (D, H, W, T') = (X/px, Y/py, Z/pz, T/pt); each vector in
        (px, py, pz, pt, channel) order, channel fastest.
    """
    B, Cin, X, Y, Z, T = x.shape
    px, py, pz, pt = patch_size
    x = x.reshape(B, Cin, X // px, px, Y // py, py, Z // pz, pz, T // pt, pt)
    return x.permute(0, 2, 4, 6, 8, 3, 5, 7, 9, 1).reshape(B, X // px, Y // py, Z // pz, T // pt, -1)


def unpatchify(patches: torch.Tensor, patch_size: tuple[int, ...], in_chans: int = 1) -> torch.Tensor:
    """Inverse of :func:`patchify`.

    Parameters
    ----------
    patches : Tensor, shape (B, D, H, W, T', px*py*pz*pt*Cin)
    patch_size : tuple (px, py, pz, pt)
    in_chans : int

    Returns
    -------
    Tensor, shape (B, Cin, D*px, H*py, W*pz, T'*pt)
    """
    B, D, H, W, T, _ = patches.shape
    px, py, pz, pt = patch_size
    x = patches.reshape(B, D, H, W, T, px, py, pz, pt, in_chans).permute(0, 9, 1, 5, 2, 6, 3, 7, 4, 8)
    return x.reshape(B, in_chans, D * px, H * py, W * pz, T * pt)


# --------------------------------------------------------------------------- layers


class PatchEmbed(nn.Module):
    """Non-overlapping 4D patches -> tokens by one linear map (``fc``).

    Parameters
    ----------
    patch_size : tuple of 4 int
    in_chans : int
    embed_dim : int
    """

    def __init__(self, patch_size: tuple[int, ...], in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.in_chans = in_chans
        self.fc = nn.Linear(in_chans * math.prod(patch_size), embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed patches.

        Parameters
        ----------
        x : Tensor, shape (B, Cin, X, Y, Z, T)

        Returns
        -------
        Tensor, shape (B, X/px, Y/py, Z/pz, T/pt, C)
        """
        # patch vector in (px, py, pz, pt, channel) order, as NeuroSTORM/SwiFT
        return self.fc(patchify(x, self.patch_size))


class PositionalEmbedding(nn.Module):
    """Learnable spatial (``pos_embed``) and temporal (``time_embed``) embeddings.

    Parameters
    ----------
    dim : int
        Channels C.
    grid : tuple (d, h, w, T)
        Token grid of the stage.
    """

    def __init__(self, dim: int, grid: tuple[int, ...]) -> None:
        super().__init__()
        d, h, w, t = grid
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, d, h, w, 1))
        self.time_embed = nn.Parameter(torch.zeros(1, dim, 1, 1, 1, t))
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-0.04, b=0.04)
        nn.init.trunc_normal_(self.time_embed, std=0.02, a=-0.04, b=0.04)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Add both embeddings to channels-last tokens (B, d, h, w, T, C)."""
        pos = self.pos_embed.permute(0, 2, 3, 4, 5, 1)  # (1, d, h, w, 1, C)
        time = self.time_embed.permute(0, 2, 3, 4, 5, 1)  # (1, 1, 1, 1, T, C)
        return x + pos + time


class MLP(nn.Module):
    """Two-layer perceptron with GELU (``linear1``, ``linear2``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.linear2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply to the last axis (..., C) -> (..., C)."""
        return self.linear2(self.act(self.linear1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample while training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:  # noqa: D102
        return f"p={self.p}"


class SWMBlock(nn.Module):
    """Shifted-window Mamba block.

    ``x + Mamba(windows(roll(LN(x))))`` then ``x + MLP(LN(x))``.

    Parameters
    ----------
    dim : int
        Channels C.
    window : tuple of 4 int
        Scanning window (already clipped to the grid).
    shift : tuple of 4 int
        Roll before scanning (zeros for unshifted blocks).
    spec : ModelSpec
        Source of ``mlp_ratio`` and the Mamba sizes.
    drop_path : float
    backend : str
    """

    def __init__(self, dim: int, window: tuple[int, ...], shift: tuple[int, ...], spec: ModelSpec,
                 drop_path: float = 0.0, backend: str = "auto") -> None:
        super().__init__()
        self.dim = dim
        self.window = tuple(window)
        self.shift = tuple(shift)
        self.norm1 = nn.LayerNorm(dim)
        self.mamba = Mamba(dim, d_state=spec.d_state, d_conv=spec.d_conv, expand=spec.expand, backend=backend)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * spec.mlp_ratio))
        self.drop_path = DropPath(drop_path)
        self.register_parameter("prompt", None)

    def extra_repr(self) -> str:  # noqa: D102
        return f"window={self.window}, shift={self.shift}"

    def add_prompt(self, length: int) -> nn.Parameter:
        """Create ``prompt`` (length, C): tokens prepended to every window's sequence."""
        if length <= 0:
            raise SpecError(f"prompt length: expected a positive integer; got {length}")
        p = torch.empty(length, self.dim, device=self.norm1.weight.device)
        nn.init.trunc_normal_(p, std=0.02, a=-0.04, b=0.04)
        self.prompt = nn.Parameter(p)
        return self.prompt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block.

        Parameters
        ----------
        x : Tensor, shape (B, D, H, W, T, C)

        Returns
        -------
        Tensor, shape (B, D, H, W, T, C)
        """
        h = self.norm1(x)
        dims = tuple(i + 1 for i, s in enumerate(self.shift) if s)
        if dims:
            h = torch.roll(h, shifts=tuple(-self.shift[d - 1] for d in dims), dims=dims)
        seq_first = not self.mamba.uses_kernels(h)
        win = window_partition(h, self.window, seq_first)
        n_prompt = 0
        if self.prompt is not None:
            n_prompt = self.prompt.shape[0]
            p = self.prompt.to(win.dtype)
            if seq_first:
                p = p[:, None, :].expand(n_prompt, win.shape[1], self.dim)
                win = torch.cat([p, win], dim=0)
            else:
                p = p[None].expand(win.shape[0], n_prompt, self.dim)
                win = torch.cat([p, win], dim=1)
        out = self.mamba(win, seq_first=seq_first)
        if n_prompt:
            out = out[n_prompt:] if seq_first else out[:, n_prompt:]
        h = window_reverse(out, self.window, h.shape[:5], seq_first)
        if dims:
            h = torch.roll(h, shifts=tuple(self.shift[d - 1] for d in dims), dims=dims)
        x = x + self.drop_path(h)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2x2 spatial merging: ``LayerNorm(8C)`` + ``Linear(8C -> 2C, bias=False)``.

    The 8 neighbours are concatenated in (i, j, k) order, i slowest, where
    (i, j, k) is the offset along (d, h, w).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(8 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(8 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W, T, C) -> (B, D/2, H/2, W/2, T, 2C)."""
        B, D, H, W, T, C = x.shape
        x = x.view(B, D // 2, 2, H // 2, 2, W // 2, 2, T, C)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6, 8).reshape(B, D // 2, H // 2, W // 2, T, 8 * C)
        return self.reduction(self.norm(x))


class PatchExpanding(nn.Module):
    """Inverse of merging: ``Linear(C -> 4C, bias=False)`` into 2x2x2 positions of C/2, then LN."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.expand = nn.Linear(dim, 4 * dim, bias=False)
        self.norm = nn.LayerNorm(dim // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W, T, C) -> (B, 2D, 2H, 2W, T, C/2)."""
        B, D, H, W, T, C = x.shape
        x = self.expand(x).view(B, D, H, W, T, 2, 2, 2, C // 2)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4, 8).reshape(B, 2 * D, 2 * H, 2 * W, T, C // 2)
        return self.norm(x)


class SWMStage(nn.Module):
    """A stage of SWM blocks (even blocks unshifted, odd blocks shifted) and an optional resampling.

    Parameters
    ----------
    dim : int
    depth : int
    window, shift : tuple of 4 int
        From :meth:`ModelSpec.stage_window` / :meth:`ModelSpec.decoder_window`.
    spec : ModelSpec
    drop_path : sequence of float
        Per-block stochastic-depth rates.
    downsample, upsample : bool
        End with :class:`PatchMerging` (encoder) or :class:`PatchExpanding` (decoder).
    backend : str
    """

    def __init__(self, dim: int, depth: int, window: tuple[int, ...], shift: tuple[int, ...],
                 spec: ModelSpec, drop_path: Iterable[float] = (), downsample: bool = False,
                 upsample: bool = False, backend: str = "auto") -> None:
        super().__init__()
        rates = list(drop_path) or [0.0] * depth
        no_shift = (0, 0, 0, 0)
        self.blocks = nn.ModuleList(
            SWMBlock(dim, window, shift if i % 2 else no_shift, spec, rates[i], backend) for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None
        self.upsample = PatchExpanding(dim) if upsample else None
        self.grad_checkpointing = False

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Run the blocks only: (B, d, h, w, T, C) -> same shape."""
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def resample(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the stage's merging/expanding, if any."""
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Blocks then resampling."""
        return self.resample(self.forward_blocks(x))


# --------------------------------------------------------------------------- models


def _set_backend(module: nn.Module, backend: str) -> None:
    check_backend_available(backend)
    for m in module.modules():
        if isinstance(m, Mamba):
            m.backend = backend


class NeuroSTORMEncoder(nn.Module):
    """Shifted-window Mamba encoder.

    Parameters
    ----------
    spec : ModelSpec
    backend : {"auto", "mamba-ssm", "torch"}
        Selective-scan backend of every Mamba layer.

    Attributes
    ----------
    patch_embed : PatchEmbed
    pos_embeds : ModuleList of PositionalEmbedding, one per stage
    layers : ModuleList of SWMStage
    num_features : int
        Channels of the output (C_last).

    Notes
    -----
    The encoder owns no mask token (NeuroSTORM keeps it in the MAE, and the
    encoder's parameter count, 5,173,020 for ``neurostorm``, excludes it).
    Inside a :class:`NeuroSTORMMAE` the MAE's ``mask_token`` is used by
    default; a stand-alone encoder needs ``mask_token=`` when masking.
    """

    def __init__(self, spec: ModelSpec, backend: str = "auto") -> None:
        super().__init__()
        check_backend_available(backend)
        self.spec = spec
        self.num_features = spec.num_features
        self.patch_embed = PatchEmbed(spec.patch_size, spec.in_chans, spec.embed_dim)
        self.pos_embeds = nn.ModuleList(
            PositionalEmbedding(dim, grid) for dim, grid in zip(spec.stage_dims, spec.stage_grids, strict=True)
        )
        n_blocks = sum(spec.depths)
        rates = [spec.drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]
        self.layers = nn.ModuleList()
        start = 0
        for s, (dim, depth) in enumerate(zip(spec.stage_dims, spec.depths, strict=True)):
            window, shift = spec.stage_window(s)
            self.layers.append(SWMStage(
                dim, depth, window, shift, spec, rates[start:start + depth],
                downsample=s < spec.num_stages - 1, backend=backend,
            ))
            start += depth
        # the owning MAE, in a list so that it is not registered as a sub-module
        self._owner: list[nn.Module] = []

    # ---------------------------------------------------------------- configuration

    def set_backend(self, backend: str) -> None:
        """Switch every Mamba layer to ``backend`` ("auto", "mamba-ssm" or "torch")."""
        _set_backend(self, backend)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass (less memory, ~30% more time)."""
        for layer in self.layers:
            layer.grad_checkpointing = bool(enable)

    def add_prompts(self, length: int) -> list[nn.Parameter]:
        """Add ``length`` learnable prompt tokens to every block (prompt tuning).

        Returns
        -------
        list of Parameter
            The new prompts, shape (length, C_stage) each.
        """
        return [blk.add_prompt(length) for layer in self.layers for blk in layer.blocks]

    def prompt_parameters(self) -> list[nn.Parameter]:
        """The prompt tokens added by :meth:`add_prompts` (empty list if none)."""
        return [blk.prompt for layer in self.layers for blk in layer.blocks if blk.prompt is not None]

    @property
    def prompt_length(self) -> int:
        """Prompt tokens per block (0 without prompts)."""
        prompts = self.prompt_parameters()
        return int(prompts[0].shape[0]) if prompts else 0

    # ---------------------------------------------------------------- forward

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` (:class:`SpecError`) unless ``x`` is (B, Cin, X, Y, Z, T) of the spec."""
        expected = (self.spec.in_chans,) + self.spec.img_size
        if x.dim() != 6 or tuple(x.shape[1:]) != expected:
            raise SpecError(
                f"input of shape {tuple(x.shape)} does not match model {self.spec.name!r}: expected "
                f"(B, {', '.join(map(str, expected))}) = (batch, channels, X, Y, Z, frames). Crop/pad the "
                f"volume and cut clips of {self.spec.img_size[3]} frames, or use a model spec with "
                f"img_size={tuple(x.shape[2:]) if x.dim() == 6 else '...'}"
            )

    def _apply_mask(self, x: torch.Tensor, token_mask: torch.Tensor | None,
                    mask_token: torch.Tensor | None) -> torch.Tensor:
        if token_mask is None:
            return x
        expected = (x.shape[0],) + tuple(self.spec.token_grid)
        if tuple(token_mask.shape) != expected:
            raise SpecError(f"token_mask of shape {tuple(token_mask.shape)} does not match the token grid: "
                            f"expected (B, D, H, W, T) = {expected}")
        if token_mask.dtype != torch.bool:
            raise TypeError(f"token_mask must be a BoolTensor (True = masked); got dtype {token_mask.dtype}")
        if mask_token is None:
            if not self._owner:
                raise ValueError("token_mask given but this encoder has no mask token: pass mask_token= "
                                 "(shape (C0,)) or call the NeuroSTORMMAE that owns the encoder")
            mask_token = self._owner[0].mask_token
        return torch.where(token_mask.to(x.device)[..., None], mask_token.to(x.dtype), x)

    def forward_stages(self, x: torch.Tensor, token_mask: torch.Tensor | None = None,
                       mask_token: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Features of every stage, channels-last.

        Parameters
        ----------
        x : Tensor, shape (B, Cin, X, Y, Z, T)
        token_mask : BoolTensor, shape (B, D, H, W, T), optional
            True where the token is replaced by the mask token.
        mask_token : Tensor, shape (C0,), optional
            Overrides the mask token (required for a stand-alone encoder).

        Returns
        -------
        list of Tensor
            Stage s output before its patch merging, shape (B, d_s, h_s, w_s, T, C_s);
            the last entry is the encoder output.
        """
        self.check_input(x)
        h = self.patch_embed(x.to(self.patch_embed.fc.weight.dtype))
        h = self._apply_mask(h, token_mask, mask_token)
        outs = []
        for pos, layer in zip(self.pos_embeds, self.layers, strict=True):
            h = layer.forward_blocks(pos(h))
            outs.append(h)
            h = layer.resample(h)
        return outs

    def forward_tokens(self, x: torch.Tensor, token_mask: torch.Tensor | None = None,
                       mask_token: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output, channels-last: (B, d, h, w, T, C_last). Arguments as :meth:`forward`."""
        return self.forward_stages(x, token_mask, mask_token)[-1]

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None,
                mask_token: torch.Tensor | None = None) -> torch.Tensor:
        """Encode a batch of 4D clips.

        Parameters
        ----------
        x : Tensor, shape (B, Cin, X, Y, Z, T)
            e.g. (B, 1, 96, 96, 96, 20) for ``neurostorm``.
        token_mask : BoolTensor, shape (B, D, H, W, T), optional
            Token-grid mask (True = replaced by the mask token after patch embedding).
        mask_token : Tensor, shape (C0,), optional
            Mask token to use; defaults to the owning MAE's ``mask_token``.

        Returns
        -------
        Tensor, shape (B, C_last, d, h, w, T)
            e.g. (B, 288, 2, 2, 2, 20) for ``neurostorm``.
        """
        return self.forward_tokens(x, token_mask, mask_token).permute(0, 5, 1, 2, 3, 4)

    def forward_features(self, x: torch.Tensor, token_mask: torch.Tensor | None = None,
                         mask_token: torch.Tensor | None = None) -> torch.Tensor:
        """Alias of :meth:`forward` (timm naming): (B, C_last, d, h, w, T)."""
        return self.forward(x, token_mask, mask_token)

    def embed(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean-pooled embedding.

        Parameters
        ----------
        x : Tensor, shape (B, Cin, X, Y, Z, T)
        token_mask : BoolTensor, shape (B, D, H, W, T), optional

        Returns
        -------
        Tensor, shape (B, C_last)
        """
        return self.forward_tokens(x, token_mask).mean(dim=(1, 2, 3, 4))


class NeuroSTORMMAE(nn.Module):
    """Masked autoencoder: :class:`NeuroSTORMEncoder` + mirrored SWM decoder.

    Parameters
    ----------
    spec : ModelSpec
    backend : {"auto", "mamba-ssm", "torch"}

    Attributes
    ----------
    spec : ModelSpec
    encoder : NeuroSTORMEncoder
        ``mae.encoder(x, token_mask=None) -> (B, C_last, d, h, w, T)``; a mask
        uses this MAE's ``mask_token``.
    mask_token : Parameter, shape (C0,)
        Replaces masked tokens (default).
    atlas_mask_token : Parameter, shape (C0,)
        Alternative token (``mask_kind="atlas"``, NeuroSTORM's atlas masking).
    window_mask_token : Parameter, shape (prod(window_size), C0)
        Kept for checkpoint compatibility with NeuroSTORM; unused here.

    Notes
    -----
    State-dict keys equal NeuroSTORM's ``NeuroSTORMMAE`` keys except that
    encoder keys carry the ``encoder.`` prefix; :func:`to_neurostorm_keys` and
    :func:`from_neurostorm_keys` convert.
    """

    def __init__(self, spec: ModelSpec, backend: str = "auto") -> None:
        super().__init__()
        check_backend_available(backend)
        self.spec = spec
        c0 = spec.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(c0))
        self.window_mask_token = nn.Parameter(torch.zeros(math.prod(spec.window_size), c0))
        self.atlas_mask_token = nn.Parameter(torch.zeros(c0))
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.04, b=0.04)
        nn.init.trunc_normal_(self.atlas_mask_token, std=0.02, a=-0.04, b=0.04)
        self.encoder = NeuroSTORMEncoder(spec, backend=backend)
        self.encoder._owner = [self]

        dims, depths = spec.decoder_dims, spec.decoder_depths
        self.first_patch_expanding = PatchExpanding(spec.num_features)
        self.layers_up = nn.ModuleList()
        for s, (dim, depth) in enumerate(zip(dims, depths, strict=True)):
            window, shift = spec.decoder_window(s)
            self.layers_up.append(SWMStage(dim, depth, window, shift, spec,
                                           upsample=s < len(dims) - 1, backend=backend))
        self.norm_up = nn.LayerNorm(c0)
        self.decoder_pred = nn.Linear(c0, spec.patch_dim)

    def set_backend(self, backend: str) -> None:
        """Switch every Mamba layer (encoder and decoder) to ``backend``."""
        _set_backend(self, backend)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass, encoder and decoder."""
        self.encoder.set_grad_checkpointing(enable)
        for layer in self.layers_up:
            layer.grad_checkpointing = bool(enable)

    def _mask_token_for(self, kind: str) -> nn.Parameter:
        if kind == "mask":
            return self.mask_token
        if kind == "atlas":
            return self.atlas_mask_token
        raise SpecError(f"mask_kind: expected 'mask' or 'atlas'; got {kind!r}")

    def forward_decoder(self, latent: torch.Tensor) -> torch.Tensor:
        """Decode encoder tokens to voxels.

        Parameters
        ----------
        latent : Tensor, shape (B, d, h, w, T, C_last)
            Channels-last encoder output (:meth:`NeuroSTORMEncoder.forward_tokens`).

        Returns
        -------
        Tensor, shape (B, Cin, X, Y, Z, T)
        """
        h = self.first_patch_expanding(latent)
        for layer in self.layers_up:
            h = layer(h)
        h = self.decoder_pred(self.norm_up(h))  # (B, D, H, W, T, px*py*pz*pt*Cin)
        return unpatchify(h, self.spec.patch_size, self.spec.in_chans)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None,
                mask_kind: str = "mask") -> torch.Tensor:
        """Reconstruct the input from its (partly masked) tokens.

        Parameters
        ----------
        x : Tensor, shape (B, Cin, X, Y, Z, T)
            Float input clips, e.g. (B, 1, 96, 96, 96, 20).
        token_mask : BoolTensor, shape (B, D, H, W, T), optional
            Mask on the token grid (:attr:`ModelSpec.token_grid`); True tokens
            are replaced by the mask token after patch embedding. None masks nothing.
        mask_kind : {"mask", "atlas"}
            Which learnable token replaces masked tokens.

        Returns
        -------
        Tensor, shape (B, Cin, X, Y, Z, T)
            Reconstruction of every voxel (the loss decides which ones count).
        """
        latent = self.encoder.forward_tokens(x, token_mask, self._mask_token_for(mask_kind))
        return self.forward_decoder(latent)

    def neurostorm_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict with NeuroSTORM's key names (encoder keys without prefix)."""
        return to_neurostorm_keys(self.state_dict())

    def load_neurostorm_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True):
        """Load a state dict with NeuroSTORM's key names; returns ``load_state_dict``'s result."""
        return self.load_state_dict(from_neurostorm_keys(state_dict), strict=strict)


def to_neurostorm_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename :class:`NeuroSTORMMAE` keys to NeuroSTORM's (drop the ``encoder.`` prefix)."""
    return {k[len(ENCODER_PREFIX):] if k.startswith(ENCODER_PREFIX) else k: v for k, v in state_dict.items()}


def from_neurostorm_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename NeuroSTORM MAE keys to :class:`NeuroSTORMMAE` keys (add ``encoder.`` to encoder keys)."""
    return {(ENCODER_PREFIX + k if k.startswith(_ENCODER_ROOTS) else k): v for k, v in state_dict.items()}


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "ENCODER_PREFIX", "MLP", "NeuroSTORMEncoder", "NeuroSTORMMAE", "PatchEmbed", "PatchExpanding",
    "PatchMerging", "PositionalEmbedding", "SWMBlock", "SWMStage", "count_parameters",
    "from_neurostorm_keys", "patchify", "to_neurostorm_keys", "unpatchify", "window_partition",
    "window_reverse",
]
