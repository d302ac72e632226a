"""Per-region reconstruction error of a masked autoencoder.

Each AAL3 lobe group is masked in turn (its patches, in every frame, as in
region-aware pretraining) and the squared error of the reconstruction is
pooled over the masked in-brain voxels of every region. Optionally each
region is also masked on its own. The accumulator also keeps a voxel map of
the mean absolute error of masked voxels and a *composite* reconstruction of
the first clip: every voxel holds its reconstruction from the pass in which
its group was masked (the input where no group masked it).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from bids_regionmae.masking import region_patches

__all__ = ["RegionErrorAccumulator", "group_patch_maps"]


def group_patch_maps(voxel_labels: torch.Tensor, groups: Mapping[str, Sequence[int]], patch_size: Sequence[int],
                     rule: str = "majority") -> dict[str, torch.Tensor]:
    """Patch maps of each group (or region) under a patch rule.

    Parameters
    ----------
    voxel_labels : LongTensor, shape (X, Y, Z)
        Atlas labels on the model's grid.
    groups : mapping of str to sequence of int
    patch_size : sequence of 3 or 4 int
    rule : {'any', 'majority', 'all'}

    Returns
    -------
    dict of str to BoolTensor, shape (D, H, W)
        Only groups with at least one patch.
    """
    out = {}
    for name, labels in groups.items():
        pmap = region_patches(voxel_labels, labels, tuple(patch_size)[:3], rule)
        if bool(pmap.any()):
            out[name] = pmap
    return out


class RegionErrorAccumulator:
    """Masked in-brain reconstruction error per region, pooled over the clips of a run.

    Parameters
    ----------
    voxel_labels : LongTensor, shape (X, Y, Z)
        Atlas labels on the model's grid.
    groups : mapping of str to sequence of int
        Lobe groups (masked one at a time).
    patch_size : sequence of 4 int
        The model's ``(px, py, pz, pt)``.
    rule : {'any', 'majority', 'all'}
        Patch rule for region membership (as in pretraining).
    region_masking : bool
        Also mask every region on its own (one pass per region: slow).
    example_group : str, optional
        Group shown in the reconstruction example (default: the first one
        with patches).

    Notes
    -----
    Call :meth:`update` with batches of clips of one run, then :meth:`rows`,
    :meth:`error_map` and :meth:`composite`.
    """

    def __init__(self, voxel_labels: torch.Tensor, groups: Mapping[str, Sequence[int]], patch_size: Sequence[int],
                 *, rule: str = "majority", region_masking: bool = False, example_group: str | None = None):
        self.labels = voxel_labels.long().cpu()
        self.groups = {g: tuple(int(i) for i in v) for g, v in groups.items()}
        self.patch_size = tuple(int(p) for p in patch_size)
        if len(self.patch_size) == 3:
            self.patch_size = self.patch_size + (1,)
        self.rule = rule
        self.group_maps = group_patch_maps(self.labels, self.groups, self.patch_size, rule)
        present = [int(v) for v in torch.unique(self.labels).tolist() if v > 0]
        self.present = present
        self.region_maps = (group_patch_maps(self.labels, {str(i): (i,) for i in present}, self.patch_size, rule)
                            if region_masking else {})
        self.n_labels = int(self.labels.max()) + 1 if self.labels.numel() else 1
        # pooled sums per (pass, label): squared error, absolute error, count
        self.sums: dict[str, np.ndarray] = {}
        self.abs_sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, np.ndarray] = {}
        self.n_clips = 0
        X, Y, Z = self.labels.shape
        self.err_sum = torch.zeros(X, Y, Z, dtype=torch.float64)
        self.err_cnt = torch.zeros(X, Y, Z, dtype=torch.float64)
        self.example_group = example_group if example_group in self.group_maps else next(iter(self.group_maps), None)
        self._composite: torch.Tensor | None = None
        self._original: torch.Tensor | None = None
        self.example: dict[str, Any] | None = None
        self._label_cache: dict[str, torch.Tensor] = {}

    def _voxels(self, pmap: torch.Tensor) -> torch.Tensor:
        px, py, pz, _ = self.patch_size
        return pmap.repeat_interleave(px, 0).repeat_interleave(py, 1).repeat_interleave(pz, 2)

    @torch.no_grad()
    def update(self, mae: nn.Module, x: torch.Tensor, brain: torch.Tensor,
               autocast: Callable[[], Any] | None = None) -> None:
        """Add a batch of clips of one run.

        Parameters
        ----------
        mae : NeuroSTORMMAE
            ``mae(x, token_mask) -> recon`` of shape (B, 1, X, Y, Z, T).
        x : Tensor, shape (B, 1, X, Y, Z, T)
            Clips on the model's grid and device.
        brain : BoolTensor, shape (B, X, Y, Z) or (X, Y, Z)
            Brain mask on the model's grid.
        autocast : callable, optional
            Context-manager factory for the forward passes (bf16 on GPU).
        """
        B, _, X, Y, Z, T = x.shape
        D, H, W = X // self.patch_size[0], Y // self.patch_size[1], Z // self.patch_size[2]
        Tt = T // self.patch_size[3]
        dev = x.device
        brain_b = (brain if brain.dim() == 4 else brain[None].expand(B, X, Y, Z)).to(dev).bool()
        labels = self._labels_on(dev)
        first = self.n_clips == 0
        passes = [("group", name, pmap) for name, pmap in self.group_maps.items()]
        passes += [("region", name, pmap) for name, pmap in self.region_maps.items()]
        if first:
            self._original = x[0, 0].float().cpu()
            self._composite = self._original.clone()
        xf = x.float()
        for kind, name, pmap in passes:
            token_mask = pmap.to(dev)[None, :, :, :, None].expand(B, D, H, W, Tt).contiguous()
            with (autocast() if autocast else contextlib.nullcontext()):
                recon = mae(x, token_mask)
            recon = recon.float()
            vox = self._voxels(pmap.to(dev))  # (X, Y, Z) bool
            sel = vox[None] & brain_b  # (B, X, Y, Z): masked in-brain voxels
            diff = (recon - xf)[:, 0][sel]  # (N, T)
            lab = labels[None].expand(B, X, Y, Z)[sel]  # (N,)
            sq = diff.pow(2).sum(-1).double()
            ab = diff.abs().sum(-1).double()
            self._accumulate(f"{kind}:{name}", lab, sq, ab, T)
            if kind == "group":
                self.err_sum += torch.zeros(B, X, Y, Z, dtype=torch.float64, device=dev).masked_scatter_(
                    sel, ab / T).sum(0).cpu()
                self.err_cnt += sel.sum(0).double().cpu()
                if first:
                    keep = sel[0].cpu()
                    self._composite[keep] = recon[0, 0].cpu()[keep]
                    if name == self.example_group:
                        self.example = {"original": self._original[..., 0].numpy(),
                                        "reconstruction": recon[0, 0, ..., 0].cpu().numpy(),
                                        "voxel_mask": vox.cpu().numpy(), "brain_mask": brain_b[0].cpu().numpy(),
                                        "group": name}
        self.n_clips += B

    def _labels_on(self, device: torch.device) -> torch.Tensor:
        key = str(device)
        if key not in self._label_cache:
            self._label_cache[key] = self.labels.to(device)
        return self._label_cache[key]

    def _accumulate(self, key: str, lab: torch.Tensor, sq: torch.Tensor, ab: torch.Tensor, T: int) -> None:
        """Per label: sums of squared and absolute errors, and the number of voxel x frame values."""
        n = self.n_labels
        s = torch.bincount(lab, weights=sq, minlength=n).cpu().numpy()
        a = torch.bincount(lab, weights=ab, minlength=n).cpu().numpy()
        c = torch.bincount(lab, minlength=n).cpu().numpy().astype(np.float64) * T
        if key in self.sums:
            self.sums[key] += s
            self.abs_sums[key] += a
            self.counts[key] += c
        else:
            self.sums[key], self.abs_sums[key], self.counts[key] = s, a, c

    # ------------------------------------------------------------------ results

    def _stat(self, key: str, labels: Sequence[int]) -> tuple[float, float, int]:
        if key not in self.sums:
            return math.nan, math.nan, 0
        idx = [i for i in labels if 0 < i < self.n_labels]
        n = float(self.counts[key][idx].sum()) if idx else 0.0
        if n <= 0:
            return math.nan, math.nan, 0
        return float(self.sums[key][idx].sum()) / n, float(self.abs_sums[key][idx].sum()) / n, int(round(n))

    def rows(self, names: Mapping[int, str] | None = None, brain: torch.Tensor | None = None) -> list[dict[str, Any]]:
        """The region-error table.

        Parameters
        ----------
        names : mapping of int to str, optional
            Region names (default: the label index).
        brain : BoolTensor, shape (X, Y, Z), optional
            Brain mask on the model's grid, for the ``n_voxels`` column.

        Returns
        -------
        list of dict
            One row per group (``level="group"``), then one per region
            masked with its group (``masking="group"``) and, with region
            masking, one per region masked alone (``masking="region"``).
            Columns: ``region``, ``index``, ``group``, ``level``, ``masking``,
            ``n_voxels`` (in-brain voxels of the region on the model grid),
            ``n_masked_values`` (voxel x frame values pooled), ``mse``,
            ``mean_abs_error``, ``n_clips``. NaN where nothing was masked.
        """
        names = names or {}
        lab = self.labels
        inside = lab if brain is None else torch.where(brain.bool().cpu(), lab, torch.zeros_like(lab))
        voxel_counts = np.bincount(inside.reshape(-1).numpy(), minlength=self.n_labels)
        group_of = {i: g for g, labels in self.groups.items() for i in labels}
        out = []
        for g, labels in self.groups.items():
            mse, mae_, n = self._stat(f"group:{g}", labels)
            out.append({"region": g, "index": "n/a", "group": g, "level": "group", "masking": "group",
                        "n_voxels": int(sum(voxel_counts[i] for i in labels if 0 < i < self.n_labels)),
                        "n_masked_values": n, "mse": mse, "mean_abs_error": mae_, "n_clips": self.n_clips})
        for i in self.present:
            g = group_of.get(i, "other")
            mse, mae_, n = self._stat(f"group:{g}", (i,)) if g in self.groups else (math.nan, math.nan, 0)
            out.append({"region": names.get(i, str(i)), "index": i, "group": g, "level": "region",
                        "masking": "group", "n_voxels": int(voxel_counts[i]), "n_masked_values": n, "mse": mse,
                        "mean_abs_error": mae_, "n_clips": self.n_clips})
        if self.region_maps:
            for i in self.present:
                mse, mae_, n = self._stat(f"region:{i}", (i,))
                out.append({"region": names.get(i, str(i)), "index": i, "group": group_of.get(i, "other"),
                            "level": "region", "masking": "region", "n_voxels": int(voxel_counts[i]),
                            "n_masked_values": n, "mse": mse, "mean_abs_error": mae_, "n_clips": self.n_clips})
        return out

    def error_map(self) -> np.ndarray:
        """Mean absolute error of masked in-brain voxels (group passes), shape (X, Y, Z), float32; 0 elsewhere."""
        out = torch.where(self.err_cnt > 0, self.err_sum / self.err_cnt.clamp_min(1), torch.zeros_like(self.err_sum))
        return out.float().numpy()

    def composite(self) -> np.ndarray | None:
        """Composite reconstruction of the first clip, shape (X, Y, Z, T), float32 (None before any update)."""
        return None if self._composite is None else self._composite.numpy()

    def original(self) -> np.ndarray | None:
        """The first clip as given to the model, shape (X, Y, Z, T), float32."""
        return None if self._original is None else self._original.numpy()
