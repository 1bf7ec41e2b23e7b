"""Blur kernels of the Real-ESRGAN degradation model, in numpy.

Mirrors `basicsr/data/degradations.py` (`random_mixed_kernels`, `bivariate_Gaussian`,
`bivariate_generalized_Gaussian`, `bivariate_plateau`, `circular_lowpass_kernel`) as used by
Real-ESRGAN's `RealESRGANDataset` and therefore by PASD training (PASD_REFERENCE §8). Every
function draws from an explicit `np.random.Generator`, so a kernel is a pure function of the rng
state. Kernels are float32 `[k, k]` summing to 1, `k` odd.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import special

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")


def _grid(size: int) -> np.ndarray:
    """[k, k, 2] (x, y) coordinates centred on the kernel centre."""
    ax = np.arange(-(size // 2), size // 2 + 1, dtype=np.float64)
    xx, yy = np.meshgrid(ax, ax)
    return np.stack([xx, yy], axis=-1)


def sigma_matrix(sig_x: float, sig_y: float, theta: float) -> np.ndarray:
    """Covariance R·diag(σx², σy²)·Rᵀ of a rotated 2-D Gaussian (basicsr `sigma_matrix2`)."""
    d = np.diag([sig_x**2, sig_y**2])
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    return rot @ d @ rot.T


def _quadratic_form(size: int, cov: np.ndarray) -> np.ndarray:
    """xᵀ Σ⁻¹ x on the kernel grid, [k, k]."""
    grid = _grid(size)
    inv = np.linalg.inv(cov)
    return np.einsum("ijk,kl,ijl->ij", grid, inv, grid)


def bivariate_gaussian(size: int, sig_x: float, sig_y: float, theta: float) -> np.ndarray:
    """exp(-½ xᵀΣ⁻¹x), normalised (basicsr `bivariate_Gaussian`)."""
    k = np.exp(-0.5 * _quadratic_form(size, sigma_matrix(sig_x, sig_y, theta)))
    return (k / k.sum()).astype(np.float32)


def bivariate_generalized_gaussian(size: int, sig_x: float, sig_y: float, theta: float,
                                   beta: float) -> np.ndarray:
    """exp(-½ (xᵀΣ⁻¹x)^β), normalised (basicsr `bivariate_generalized_Gaussian`)."""
    k = np.exp(-0.5 * np.power(_quadratic_form(size, sigma_matrix(sig_x, sig_y, theta)), beta))
    return (k / k.sum()).astype(np.float32)


def bivariate_plateau(size: int, sig_x: float, sig_y: float, theta: float, beta: float) -> np.ndarray:
    """1 / ((xᵀΣ⁻¹x)^β + 1), normalised (basicsr `bivariate_plateau`)."""
    k = np.reciprocal(np.power(_quadratic_form(size, sigma_matrix(sig_x, sig_y, theta)), beta) + 1)
    return (k / k.sum()).astype(np.float32)


def circular_lowpass_kernel(cutoff: float, size: int, pad_to: int = 0) -> np.ndarray:
    """2-D sinc (ideal circular low-pass) with cut-off ω_c (basicsr `circular_lowpass_kernel`)."""
    if size % 2 == 0:
        raise ValueError(f"kernel size must be odd, got {size}")
    c = (size - 1) / 2
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    r = np.sqrt((x - c) ** 2 + (y - c) ** 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        k = cutoff * special.j1(cutoff * r) / (2 * np.pi * r)
    k[int(c), int(c)] = cutoff**2 / (4 * np.pi)  # limit r -> 0
    k = k / k.sum()
    return pad_kernel(k, pad_to).astype(np.float32)


def pad_kernel(kernel: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad an odd [k, k] kernel to [size, size] (no-op when size <= k)."""
    k = kernel.shape[0]
    if size <= k:
        return kernel
    p = (size - k) // 2
    return np.pad(kernel, ((p, p), (p, p)))


def random_mixed_kernel(rng: np.random.Generator, size: int, kernel_list: Sequence[str],
                        kernel_prob: Sequence[float], sigma_range: Sequence[float],
                        betag_range: Sequence[float], betap_range: Sequence[float],
                        rotation_range: Sequence[float] = (-np.pi, np.pi)) -> np.ndarray:
    """One kernel of a type drawn from `kernel_list` with `kernel_prob` (basicsr `random_mixed_kernels`).

    Isotropic types use σx = σy and no rotation; anisotropic ones draw σx, σy and θ independently.
    (basicsr's optional multiplicative noise on the kernel is off in Real-ESRGAN and omitted.)
    """
    kind = kernel_list[rng.choice(len(kernel_list), p=np.asarray(kernel_prob) / np.sum(kernel_prob))]
    if kind not in KERNEL_TYPES:
        raise ValueError(f"unknown kernel type {kind!r}; expected one of {KERNEL_TYPES}")
    iso = kind.endswith("iso") and not kind.endswith("aniso")
    sig_x = rng.uniform(*sigma_range)
    sig_y, theta = (sig_x, 0.0) if iso else (rng.uniform(*sigma_range), rng.uniform(*rotation_range))
    if kind.startswith("generalized"):
        # basicsr: β < 1 with prob 0.5 from [β0, 1), else from [1, β1].
        beta = rng.uniform(betag_range[0], 1) if rng.uniform() < 0.5 else rng.uniform(1, betag_range[1])
        return bivariate_generalized_gaussian(size, sig_x, sig_y, theta, beta)
    if kind.startswith("plateau"):
        beta = rng.uniform(betap_range[0], 1) if rng.uniform() < 0.5 else rng.uniform(1, betap_range[1])
        return bivariate_plateau(size, sig_x, sig_y, theta, beta)
    return bivariate_gaussian(size, sig_x, sig_y, theta)


def random_blur_kernel(rng: np.random.Generator, cfg: Mapping[str, Any], pad_to: int = 21) -> np.ndarray:
    """Kernel 1 / kernel 2 of `RealESRGANDataset.__getitem__`: odd size in `kernel_range`, a sinc with
    prob `sinc_prob` (ω_c ~ U[π/3, π] for size < 13, else U[π/5, π]), else a mixed kernel; padded to 21.

    cfg keys: kernel_range, sinc_prob, kernel_list, kernel_prob, sigma, betag, betap.
    """
    lo, hi = cfg["kernel_range"]
    size = int(rng.choice(np.arange(lo, hi + 1, 2)))
    if rng.uniform() < cfg["sinc_prob"]:
        cutoff = rng.uniform(np.pi / 3, np.pi) if size < 13 else rng.uniform(np.pi / 5, np.pi)
        return circular_lowpass_kernel(cutoff, size, pad_to)
    k = random_mixed_kernel(rng, size, cfg["kernel_list"], cfg["kernel_prob"], cfg["sigma"],
                            cfg["betag"], cfg["betap"])
    return pad_kernel(k, pad_to).astype(np.float32)


def random_final_sinc(rng: np.random.Generator, cfg: Mapping[str, Any], pad_to: int = 21) -> np.ndarray:
    """The final sinc filter: with prob `final_sinc_prob` a sinc (size in `kernel_range`,
    ω_c ~ U[π/3, π]), else the identity (a centred pulse)."""
    lo, hi = cfg["kernel_range"]
    if rng.uniform() < cfg["final_sinc_prob"]:
        size = int(rng.choice(np.arange(lo, hi + 1, 2)))
        return circular_lowpass_kernel(rng.uniform(np.pi / 3, np.pi), size, pad_to)
    pulse = np.zeros((pad_to, pad_to), np.float32)
    pulse[pad_to // 2, pad_to // 2] = 1.0
    return pulse
