"""Masking strategies, voxel-level masking and masked losses on small synthetic label maps."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from bids_regionmae.masking import (
    PATCH_RULES,
    EmptyRegionError,
    apply_voxel_mask,
    build_masker,
    label_patch_fractions,
    masked_mse,
    patch_fraction,
    per_region_mse,
    random_region_mask,
    random_tube_mask,
    region_patches,
    region_tube_mask,
    token_to_voxel_mask,
)

P = 6
PS = (P, P, P, 1)
N = 24  # voxels per axis -> 4x4x4 = 64 patches
T = 5
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def make_labels() -> torch.Tensor:
    """24^3 label map with box regions chosen to exercise the patch rules.

    1: 8 whole patches; 2: 4 whole patches; 3: 2 whole + 2 patches at 4/6
    (majority, not all); 6: 4 whole patches; 4: 2 voxel-thick slab covering
    1/3 of 4 patches (any only); 5: a single voxel (any only).
    """
    lab = torch.zeros(N, N, N, dtype=torch.long)
    lab[0:12, 0:12, 0:12] = 1
    lab[12:24, 0:12, 0:6] = 2
    lab[0:10, 12:24, 0:6] = 3
    lab[12:24, 12:24, 6:12] = 6
    lab[12:14, 12:24, 12:24] = 4
    lab[23, 23, 0] = 5
    return lab


@pytest.fixture
def labels() -> torch.Tensor:
    return make_labels()


@pytest.fixture
def brain(labels) -> torch.Tensor:
    b = labels > 0
    b[:, :, 0:18] = True  # unlabelled brain (e.g. white matter) around the regions
    return b


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_tube(mask: torch.Tensor) -> None:
    assert mask.dtype == torch.bool and mask.dim() == 5
    assert torch.equal(mask, mask[..., :1].expand_as(mask))


def upsample(mask: torch.Tensor, size=PS) -> torch.Tensor:
    """Reference voxel upsampling with repeat_interleave."""
    m = mask
    for axis, p in zip((1, 2, 3, 4), size, strict=True):
        m = m.repeat_interleave(p, dim=axis)
    return m[:, None]


# --------------------------------------------------------------------------- patch maps


def test_label_patch_fractions_matches_patch_fraction(labels):
    present, fr = label_patch_fractions(labels, (P, P, P))
    assert present.tolist() == [1, 2, 3, 4, 5, 6]
    for i, k in enumerate(present.tolist()):
        assert torch.allclose(fr[i], patch_fraction(labels == k, (P, P, P)))


def test_patch_rules_nested(labels):
    for k in range(1, 7):
        maps = {r: region_patches(labels, [k], (P, P, P), r) for r in PATCH_RULES}
        assert not (maps["majority"] & ~maps["any"]).any()
        assert not (maps["all"] & ~maps["majority"]).any()
    counts = {r: int(region_patches(labels, [3], (P, P, P), r).sum()) for r in PATCH_RULES}
    assert counts == {"any": 4, "majority": 4, "all": 2}
    counts = {r: int(region_patches(labels, [4], (P, P, P), r).sum()) for r in PATCH_RULES}
    assert counts == {"any": 4, "majority": 0, "all": 0}


# --------------------------------------------------------------------------- random


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 1.0])
def test_random_exact_fraction_all_patches(labels, ratio):
    m = build_masker("random", labels, PS, ratio=ratio, T=T)
    mask = m(3, gen())
    assert mask.shape == (3, 4, 4, 4, T)
    assert_tube(mask)
    assert mask[..., 0].flatten(1).sum(1).tolist() == [round(ratio * 64)] * 3
    assert m.describe()["n_masked_patches"] == round(ratio * 64)


def test_random_brain_candidates(labels, brain):
    m = build_masker("random", labels, PS, ratio=0.5, T=T, brain_mask=brain, candidates="brain")
    cand = patch_fraction(brain, (P, P, P)) > 0
    assert torch.equal(m.region_patch_map, cand)
    mask = m(4, gen())
    n = int(cand.sum())
    assert mask[..., 0].flatten(1).sum(1).tolist() == [round(0.5 * n)] * 4
    assert not (mask[..., 0] & ~cand).any()  # never outside the brain
    # samples differ from each other
    assert not torch.equal(mask[0], mask[1])


def test_random_tube_function_direct():
    cand = torch.zeros(4, 4, 4, dtype=torch.bool)
    cand[:2] = True
    mask = random_tube_mask(cand, 2, 7, 0.3, generator=gen(1))
    assert mask.shape == (2, 4, 4, 4, 7)
    assert_tube(mask)
    assert mask[..., 0].flatten(1).sum(1).tolist() == [round(0.3 * 32)] * 2
    with pytest.raises(ValueError, match="ratio"):
        random_tube_mask(cand, 2, 7, 0.0)
    with pytest.raises(ValueError, match="ratio"):
        random_tube_mask(cand, 2, 7, 1.5)


# --------------------------------------------------------------------------- region


def test_region_whole(labels):
    m = build_masker("region", labels, PS, labels=[1, 6], T=T)
    expected = region_patches(labels, [1, 6], (P, P, P), "majority")
    assert torch.equal(m.region_patch_map, expected)
    mask = m(2, gen())
    assert_tube(mask)
    assert torch.equal(mask[0, ..., 0], expected) and torch.equal(mask[1, ..., 0], expected)
    d = m.describe()
    assert d["n_masked_patches"] == 12 and d["labels"] == [1, 6] and d["empty_labels"] == []
    json.dumps(d)


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.9])
def test_region_partial_exact_fraction(labels, fraction):
    m = build_masker("region", labels, PS, labels=[1, 6], fraction=fraction, T=T)
    mask = m(5, gen(3))
    assert_tube(mask)
    assert mask[..., 0].flatten(1).sum(1).tolist() == [round(fraction * 12)] * 5
    assert not (mask[..., 0] & ~m.region_patch_map).any()


def test_region_rule_changes_map(labels):
    any_ = build_masker("region", labels, PS, labels=[3, 4], rule="any", T=T).region_patch_map
    maj = build_masker("region", labels, PS, labels=[3, 4], rule="majority", T=T).region_patch_map
    all_ = build_masker("region", labels, PS, labels=[3, 4], rule="all", T=T).region_patch_map
    assert int(any_.sum()) == 8 and int(maj.sum()) == 4 and int(all_.sum()) == 2
    assert not (maj & ~any_).any() and not (all_ & ~maj).any()


def test_region_empty_labels_warn(labels, caplog):
    with caplog.at_level(logging.WARNING, logger="bids_regionmae.masking"):
        m = build_masker("region", labels, PS, labels=[1, 4, 99], T=T)
    assert m.describe()["empty_labels"] == [4, 99]
    text = caplog.text
    assert "[4, 99]" in text and "majority" in text
    assert int(m.region_patch_map.sum()) == 8


def test_region_all_empty_raises(labels):
    with pytest.raises(EmptyRegionError, match=r"\[4, 5\]"):
        build_masker("region", labels, PS, labels=[4, 5], T=T)
    with pytest.raises(ValueError, match="nothing to mask"):  # EmptyRegionError is a ValueError
        build_masker("region", labels, PS, labels=[5], rule="all", T=T)
    # the same labels are fine under the 'any' rule
    assert int(build_masker("region", labels, PS, labels=[4, 5], rule="any", T=T).region_patch_map.sum()) == 5
    with pytest.raises(EmptyRegionError):
        region_tube_mask(torch.zeros(4, 4, 4, dtype=torch.bool), 2, T)


def test_region_needs_labels(labels):
    with pytest.raises(ValueError, match="needs labels"):
        build_masker("region", labels, PS, T=T)


# --------------------------------------------------------------------------- random-region


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.8, 1.0])
def test_random_region_ratio_bound(labels, caplog, ratio):
    with caplog.at_level(logging.WARNING):
        m = build_masker("random-region", labels, PS, ratio=ratio, T=T)
    # regions 4 and 5 vanish under 'majority' and are reported
    assert m.region_labels.tolist() == [1, 2, 3, 6]
    assert m.empty_labels == [4, 5] and "[4, 5]" in caplog.text
    sizes = {k: int(mp.sum()) for k, mp in zip(m.region_labels.tolist(), m.region_maps, strict=True)}
    n = m.n_candidates
    assert n == sum(sizes.values()) == 20
    target = round(ratio * n)
    mask = m(16, gen(5))
    assert_tube(mask)
    for b in range(16):
        sp = mask[b, ..., 0]
        chosen = [k for k, mp in zip(m.region_labels.tolist(), m.region_maps, strict=True) if (sp & mp).any()]
        # whole regions only
        for k in chosen:
            assert torch.equal(sp & m.region_maps[m.region_labels.tolist().index(k)],
                               m.region_maps[m.region_labels.tolist().index(k)])
        count = int(sp.sum())
        assert count >= target
        # removing any one chosen region would fall below the target... at least one of them:
        assert min(count - sizes[k] for k in chosen) < target
        assert count < target + max(sizes.values())


def test_random_region_pool_and_determinism(labels):
    m = build_masker("random-region", labels, PS, labels=[1, 2, 3], ratio=0.5, T=T)
    assert m.region_labels.tolist() == [1, 2, 3]
    a, b, c = m(8, gen(11)), m(8, gen(11)), m(8, gen(12))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not (a[..., 0] & ~m.region_patch_map).any()


def test_random_region_all_empty(labels):
    with pytest.raises(EmptyRegionError):
        build_masker("random-region", labels, PS, labels=[4, 5], T=T)


def test_random_region_overlapping_any_rule():
    maps = torch.zeros(3, 2, 2, 2, dtype=torch.bool)
    maps[0, 0] = True  # 4 patches
    maps[1, :, 0] = True  # 4 patches, 2 shared with region 0
    maps[2, 1, 1, 1] = True  # 1 patch
    mask = random_region_mask(maps, 32, 3, 0.5, generator=gen(2))
    union = maps.any(0)
    target = round(0.5 * int(union.sum()))
    counts = mask[..., 0].flatten(1).sum(1)
    assert (counts >= target).all()
    assert not (mask[..., 0] & ~union).any()


# --------------------------------------------------------------------------- determinism, devices


@pytest.mark.parametrize("strategy,kw", [("random", {}), ("region", {"labels": [1, 3, 6], "fraction": 0.5}),
                                         ("random-region", {"ratio": 0.4})])
def test_determinism(labels, strategy, kw):
    m = build_masker(strategy, labels, PS, T=T, **kw)
    assert torch.equal(m(4, gen(7)), m(4, gen(7)))
    assert not torch.equal(m(4, gen(7)), m(4, gen(8)))
    g = gen(9)
    assert not torch.equal(m(4, g), m(4, g))  # the generator advances
    out = m(2, gen(0), device="cpu")
    assert out.device.type == "cpu" and out.dtype == torch.bool and out.is_contiguous()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_matches_cpu(labels):
    m = build_masker("random-region", labels, PS, T=T, device="cuda")
    assert m.region_patch_map.device.type == "cuda"
    a = m(4, gen(3), device="cuda")
    assert a.device.type == "cuda"
    assert torch.equal(a.cpu(), m(4, gen(3), device="cpu"))


def test_bad_arguments(labels):
    with pytest.raises(ValueError, match="strategy must be one of"):
        build_masker("lobes", labels, PS, T=T)
    with pytest.raises(ValueError, match="rule must be one of"):
        build_masker("random", labels, PS, T=T, rule="most")
    with pytest.raises(ValueError, match="does not divide"):
        build_masker("random", labels, (5, 5, 5, 1), T=T)
    with pytest.raises(ValueError, match="fraction"):
        build_masker("region", labels, PS, labels=[1], fraction=0.0, T=T)


# --------------------------------------------------------------------------- voxel level


def test_voxel_mask_equals_upsampled_token_mask(labels):
    mask = build_masker("random", labels, PS, ratio=0.5, T=T)(2, gen())
    vm = token_to_voxel_mask(mask, PS)
    assert vm.shape == (2, 1, N, N, N, T)
    assert torch.equal(vm, upsample(mask))
    # temporal patches
    tm = torch.rand(2, 4, 4, 4, 3, generator=gen(1)) > 0.5
    assert torch.equal(token_to_voxel_mask(tm, (P, P, P, 2)), upsample(tm, (P, P, P, 2)))


def test_apply_voxel_mask(labels):
    mask = build_masker("region", labels, PS, labels=[1], T=T)(2, gen())
    x = torch.randn(2, 1, N, N, N, T, generator=gen(4))
    out = apply_voxel_mask(x, mask, PS, mask_value=-3.0)
    vm = upsample(mask)
    assert (out[vm] == -3.0).all()
    assert torch.equal(out[~vm], x[~vm])
    assert not torch.equal(out, x) and x.ne(-3.0).all()  # input untouched
    with pytest.raises(ValueError, match="does not match"):
        apply_voxel_mask(x[:, :, :12], mask, PS)


# --------------------------------------------------------------------------- loss


def naive_masked_mse(recon, target, mask, brain=None, size=PS):
    w = upsample(mask, size).expand_as(recon).clone()
    if brain is not None:
        w &= brain.reshape(-1, 1, N, N, N, 1).expand_as(recon)
    return ((recon - target) ** 2)[w].mean()


@pytest.fixture
def volumes():
    g = gen(21)
    target = torch.randn(2, 1, N, N, N, T, generator=g)
    recon = target + 0.5 * torch.randn(2, 1, N, N, N, T, generator=g)
    return recon, target


def test_masked_mse_matches_naive(labels, brain, volumes):
    recon, target = volumes
    mask = build_masker("random", labels, PS, ratio=0.5, T=T)(2, gen())
    loss = masked_mse(recon, target, mask, PS, brain_mask=brain)
    assert loss.shape == ()
    assert torch.allclose(loss, naive_masked_mse(recon, target, mask, brain), rtol=1e-5)
    bg = masked_mse(recon, target, mask, PS, brain_mask=brain, include_background=True)
    assert torch.allclose(bg, naive_masked_mse(recon, target, mask), rtol=1e-5)
    assert torch.allclose(masked_mse(recon, target, mask, PS), bg)  # no brain mask: all voxels
    # per-sample brain masks
    b2 = torch.stack([brain, labels > 0])
    assert torch.allclose(masked_mse(recon, target, mask, PS, brain_mask=b2),
                          naive_masked_mse(recon, target, mask, b2), rtol=1e-5)
    # temporal patch size 2 (T=6)
    r6, t6 = recon[..., :4].repeat(1, 1, 1, 1, 1, 2)[..., :6], target[..., :4].repeat(1, 1, 1, 1, 1, 2)[..., :6]
    m6 = torch.rand(2, 4, 4, 4, 3, generator=gen(2)) > 0.5
    assert torch.allclose(masked_mse(r6, t6, m6, (P, P, P, 2), brain_mask=brain),
                          naive_masked_mse(r6, t6, m6, brain, (P, P, P, 2)), rtol=1e-5)


def test_background_never_a_target(labels, brain, volumes):
    recon, target = volumes
    mask = build_masker("random", labels, PS, ratio=0.5, T=T)(2, gen())
    vm = upsample(mask).expand_as(recon)
    inside = brain[None, None, ..., None].expand_as(recon)
    base = masked_mse(recon, target, mask, PS, brain_mask=brain)
    assert (vm & ~inside).any() and (~vm & inside).any()  # the mask touches background and brain
    # perturb masked background voxels and unmasked voxels: no change
    noisy = recon + 100.0 * (~(vm & inside)).float()
    assert torch.allclose(masked_mse(noisy, target, mask, PS, brain_mask=brain), base)
    # perturb masked brain voxels: changes
    noisy = recon + 1.0 * (vm & inside).float()
    assert not torch.allclose(masked_mse(noisy, target, mask, PS, brain_mask=brain), base)
    # NeuroSTORM parity: masked background counts, unmasked still does not
    base_bg = masked_mse(recon, target, mask, PS, brain_mask=brain, include_background=True)
    noisy = recon + 1.0 * (vm & ~inside).float()
    assert not torch.allclose(masked_mse(noisy, target, mask, PS, brain_mask=brain, include_background=True),
                              base_bg)
    noisy = recon + 100.0 * (~vm).float()
    assert torch.allclose(masked_mse(noisy, target, mask, PS, brain_mask=brain, include_background=True),
                          base_bg)


def test_loss_zero_when_nothing_counts(labels, volumes):
    recon, target = volumes
    recon = recon.clone().requires_grad_(True)
    mask = torch.zeros(2, 4, 4, 4, T, dtype=torch.bool)
    mask[:, 3, 3, 3] = True  # a background patch
    brain = torch.zeros(N, N, N, dtype=torch.bool)
    brain[:6, :6, :6] = True
    loss = masked_mse(recon, target, mask, PS, brain_mask=brain)
    assert loss.item() == 0.0
    loss.backward()
    assert recon.grad is not None and not recon.grad.any()


def test_norm_patch(labels, brain, volumes):
    recon, target = volumes
    target = 3.0 * target + 5.0
    mask = build_masker("random", labels, PS, ratio=0.5, T=T)(2, gen())
    # reference without brain mask: normalise each (6,6,6,1) patch of the target over its voxels
    tp = target.reshape(2, 1, 4, P, 4, P, 4, P, T, 1)
    mean = tp.mean(dim=(1, 3, 5, 7, 9), keepdim=True)
    var = tp.var(dim=(1, 3, 5, 7, 9), keepdim=True, unbiased=False)
    tn = ((tp - mean) / torch.sqrt(var + 1e-6)).reshape_as(target)
    got = masked_mse(recon, target, mask, PS, norm_patch=True)
    assert torch.allclose(got, naive_masked_mse(recon, tn, mask), rtol=1e-5)
    # a reconstruction equal to the normalised target has zero loss, with or without a brain mask
    assert float(masked_mse(tn, target, mask, PS, norm_patch=True)) < 1e-8
    # with a brain mask, background of the target does not affect the statistics
    t2 = target.clone()
    t2[~brain[None, None, ..., None].expand_as(t2)] = 1e3
    a = masked_mse(recon, target, mask, PS, brain_mask=brain, norm_patch=True)
    b = masked_mse(recon, t2, mask, PS, brain_mask=brain, norm_patch=True)
    assert torch.allclose(a, b)


def test_gradients_flow(labels, brain, volumes):
    recon, target = volumes
    recon = recon.clone().requires_grad_(True)
    mask = build_masker("region", labels, PS, labels=[1, 6], fraction=0.5, T=T)(2, gen())
    loss = masked_mse(recon, target, mask, PS, brain_mask=brain, norm_patch=True)
    loss.backward()
    grad = recon.grad
    counted = upsample(mask).expand_as(recon) & brain[None, None, ..., None].expand_as(recon)
    assert grad[counted].abs().sum() > 0
    assert not grad[~counted].any()


def test_per_region_mse_hand_made(labels):
    B = 2
    target = torch.zeros(B, 1, N, N, N, T)
    recon = torch.zeros_like(target)
    recon[:, :, labels == 1] = 1.0  # error 1 in region 1
    recon[:, :, labels == 6] = 2.0  # error 4 in region 6
    recon[:, :, labels == 2] = 3.0  # region 2 is never masked below
    mask = torch.zeros(B, 4, 4, 4, T, dtype=torch.bool)
    mask[0] = region_patches(labels, [1], (P, P, P), "majority")[..., None]  # sample 0: region 1
    mask[1] = region_patches(labels, [6], (P, P, P), "majority")[..., None]  # sample 1: region 6
    mask[1, ..., 0] |= region_patches(labels, [1], (P, P, P), "majority")  # + region 1 in frame 0 only
    groups = {"r1": [1], "r6": [6], "r1+r6": [1, 6], "r2": [2], "tiny": [4, 5], "absent": [99]}
    out = per_region_mse(recon, target, mask, labels, groups, PS)
    assert list(out) == list(groups)
    assert out["r1"] == pytest.approx(1.0)
    assert out["r6"] == pytest.approx(4.0)
    n1 = int((labels == 1).sum()) * (T + 1)  # sample 0: T frames, sample 1: 1 frame
    n6 = int((labels == 6).sum()) * T
    assert out["r1+r6"] == pytest.approx((n1 * 1.0 + n6 * 4.0) / (n1 + n6))
    assert math.isnan(out["r2"]) and math.isnan(out["tiny"]) and math.isnan(out["absent"])
    # the brain mask removes voxels: half of region 1 outside the brain
    brain = labels > 0
    brain[0:6] = False
    recon[:, :, 0:6] = 10.0
    out = per_region_mse(recon, target, mask, labels, {"r1": [1]}, PS, brain_mask=brain)
    assert out["r1"] == pytest.approx(1.0)


def test_per_region_mse_matches_naive(labels, brain, volumes):
    recon, target = volumes
    mask = build_masker("random-region", labels, PS, ratio=0.5, rule="any", T=T)(2, gen(6))
    groups = {"a": [1, 2], "b": [3, 4, 5], "c": [6]}
    out = per_region_mse(recon, target, mask, labels, groups, PS, brain_mask=brain)
    vm = upsample(mask).expand_as(recon)
    for name, labs in groups.items():
        sel = vm & torch.isin(labels, torch.tensor(labs))[None, None, ..., None].expand_as(recon)
        sel &= brain[None, None, ..., None].expand_as(recon)
        ref = ((recon - target) ** 2)[sel].mean().item() if sel.any() else float("nan")
        assert out[name] == pytest.approx(ref, rel=1e-5, nan_ok=True)


def test_loss_shape_errors(labels, volumes):
    recon, target = volumes
    mask = torch.zeros(2, 4, 4, 4, T, dtype=torch.bool)
    with pytest.raises(ValueError, match="token_mask"):
        masked_mse(recon, target, mask[..., :2], PS)
    with pytest.raises(ValueError, match="differ"):
        masked_mse(recon, target[:1], mask, PS)
    with pytest.raises(ValueError, match="brain_mask"):
        masked_mse(recon, target, mask, PS, brain_mask=torch.ones(N, N, dtype=torch.bool))


# --------------------------------------------------------------------------- real atlas (optional)


@pytest.mark.realdata
@pytest.mark.skipif(not (SHARED / "aal3").is_dir(), reason="../shared/data absent")
def test_real_aal3_patch_level(caplog):
    nib = pytest.importorskip("nibabel")
    from bids_regionmae.grid import source_to_model

    img = nib.load(SHARED / "aal3" / "tpl-MNI152NLin6Asym_res-02_atlas-AAL3_dseg.nii.gz")
    vl = torch.from_numpy(source_to_model(img.get_fdata().round().astype("int64")))
    present, fr = label_patch_fractions(vl, (P, P, P))
    assert present.numel() == 166
    with caplog.at_level(logging.WARNING):
        m = build_masker("region", vl, PS, labels=list(range(95, 121)), T=20)  # cerebellum
    assert m.grid == (16, 16, 16, 20)
    assert m.empty_labels and "no patch of their own" in caplog.text
    mask = m(2, gen())
    assert_tube(mask)
    rr = build_masker("random-region", vl, PS, ratio=0.5, T=20)
    counts = rr(4, gen())[..., 0].flatten(1).sum(1)
    assert (counts >= round(0.5 * rr.n_candidates)).all()


# --------------------------------------------------------------------------- the masking plan


def test_strategy_names_are_one_vocabulary():
    from bids_regionmae.choices import MASK_STRATEGIES
    from bids_regionmae.config import MaskingConfig
    from bids_regionmae.masking import STRATEGIES, MaskStrategy, register_strategy, strategy_class

    assert tuple(STRATEGIES) == MASK_STRATEGIES
    assert {strategy_class(name).name for name in MASK_STRATEGIES} == set(MASK_STRATEGIES)
    assert [s for s in MASK_STRATEGIES if strategy_class(s).uses_regions] == ["region"]
    with pytest.raises(Exception, match="strategy"):
        MaskingConfig(strategy="lobes")

    class Lobes(MaskStrategy):
        name = "lobes"

    with pytest.raises(ValueError, match="MASK_STRATEGIES"):
        register_strategy(Lobes)


def test_masking_plan_is_checked_once_and_round_trips(labels):
    from bids_regionmae.errors import UsageError
    from bids_regionmae.masking import MaskingPlan

    plan = MaskingPlan("region", "cerebellum+frontal", (6, 1, 1), rule="any", fraction=0.5, level="voxel")
    assert plan.labels == (1, 6) and plan.uses_regions and plan.tag() == "region-cerebellum+frontal-frac50-voxel"
    assert plan.text() == "region-aware masking of cerebellum+frontal (patch rule any)"
    assert MaskingPlan.from_dict(plan.to_dict()) == plan
    assert plan.main_group({"frontal": (1, 2), "cerebellum": (6, 7, 8)}) == "frontal"  # one label each: the first
    assert MaskingPlan("region", "cerebellum", (95,)).main_group({"cerebellum": (95, 96), "x": (95,)}) == "cerebellum"
    random = MaskingPlan("random", "ignored", (3,), ratio=0.25)
    assert random.labels == () and random.region is None and random.tag() == "random-ratio25"
    assert random.main_group({"a": (1,)}) is None
    for bad, match in (({"strategy": "region"}, "--regions"), ({"strategy": "random", "ratio": 0.0}, "--mask-ratio"),
                       ({"strategy": "random", "rule": "most"}, "--patch-rule"),
                       ({"strategy": "lobes"}, "--mask-strategy"),
                       ({"strategy": "random", "level": "patch"}, "--mask-level")):
        with pytest.raises(UsageError, match=match):
            MaskingPlan(**bad)
    masker = plan.build_masker(labels, PS, T=T)
    assert masker.strategy == "region" and masker.labels == [1, 6] and masker.rule == "any"
    assert masker.fraction == 0.5 and masker(2, gen()).shape == (2, *masker.grid)
