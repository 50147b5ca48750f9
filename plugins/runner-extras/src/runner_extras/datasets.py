"""Datasets that need no download.

``extras:npz`` reads images and labels from a NumPy ``.npz`` file: the usual way to hand a
prepared dataset to someone (``np.savez_compressed("digits.npz", images=…, labels=…)``).

``extras:shapes`` draws circles, squares, triangles and crosses at random positions, sizes and
angles, deterministically from a seed: a dataset of any size that exists on every machine, for
checking a pipeline end to end before the real data is at hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from runner.plugin_api import DatasetRequest, InMemoryImages, SpecError

NPZ_OPTIONS = ("path", "images_key", "labels_key", "classes")
SHAPES = ("circle", "square", "triangle", "cross")
SHAPES_OPTIONS = ("n_per_class", "size", "seed", "noise")


# ------------------------------------------------------------------------------------------
# extras:npz


def _resolve(path: str, base_dir: str) -> Path:
    resolved = Path(path).expanduser()
    return resolved if resolved.is_absolute() else Path(base_dir) / resolved


def _to_uint8_nchw(images: np.ndarray, where: str) -> np.ndarray:
    """``(N, H, W)``, ``(N, C, H, W)`` or ``(N, H, W, C)`` (C of 1, 3 or 4) as uint8 ``(N, C, H, W)``."""
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4:
        # gray or RGB channels first win; else 1, 3 or 4 (RGBA) trailing values mean channels last
        if images.shape[1] not in (1, 3) and images.shape[-1] in (1, 3, 4):
            images = images.transpose(0, 3, 1, 2)
    else:
        raise SpecError(f"{where}: images must have shape (N, H, W), (N, C, H, W) or (N, H, W, C), got {images.shape}")
    if images.dtype == np.uint8:
        return np.ascontiguousarray(images)
    if np.issubdtype(images.dtype, np.floating) and images.size and 0.0 <= images.min() and images.max() <= 1.0:
        return np.ascontiguousarray(np.round(images * 255).astype(np.uint8))
    raise SpecError(f"{where}: images must be uint8, or floats in [0, 1]; got {images.dtype}")


def _class_names(arrays: Any, options: dict[str, Any], labels: np.ndarray, where: str) -> list[str]:
    if "classes" in options:
        names = [str(c) for c in options["classes"]]
    elif "classes" in arrays.files:
        names = [str(c) for c in arrays["classes"].tolist()]
    else:
        names = [str(i) for i in range(int(labels.max()) + 1 if labels.size else 0)]
    if labels.size and int(labels.max()) >= len(names):
        raise SpecError(f"{where}: label {int(labels.max())} has no class name ({len(names)} given)")
    return names


def load_npz(request: DatasetRequest) -> InMemoryImages:
    """Images and integer labels from an ``.npz`` file.

    Options: ``path`` (required; relative paths are relative to the spec file), ``images_key``
    (default ``images``), ``labels_key`` (default ``labels``), ``classes`` (class names; default:
    the file's ``classes`` array, else the label numbers). Object arrays are refused: the file is
    read with ``allow_pickle=False``, so it can never run code.
    """
    options = dict(request.options)
    unknown = sorted(set(options) - set(NPZ_OPTIONS))
    if unknown:
        raise SpecError(f"data.options: extras:npz takes {', '.join(NPZ_OPTIONS)}; unknown: {', '.join(unknown)}")
    if "path" not in options:
        raise SpecError("data.options.path is required for extras:npz (an .npz file with images and labels)")
    path = _resolve(str(options["path"]), request.base_dir)
    if not path.is_file():
        raise SpecError(f"data.options.path: no such file: {path}")
    images_key, labels_key = options.get("images_key", "images"), options.get("labels_key", "labels")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            missing = [k for k in (images_key, labels_key) if k not in arrays.files]
            if missing:
                raise SpecError(f"data.options.path: {path.name} has no array {missing[0]!r} (it has {', '.join(arrays.files)})")
            images, labels = arrays[images_key], arrays[labels_key]
            classes = _class_names(arrays, options, labels.reshape(-1), f"data.options ({path.name})")
    except (ValueError, OSError) as exc:  # not an npz, or object arrays that would need pickle
        raise SpecError(f"data.options.path: {path.name} cannot be read safely: {str(exc).splitlines()[0]}") from None
    labels = labels.reshape(-1)
    if not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
        raise SpecError(f"data.options.path: {path.name}: labels must be non-negative integers")
    if len(labels) != len(images):
        raise SpecError(f"data.options.path: {path.name} has {len(images)} images but {len(labels)} labels")
    pixels = _to_uint8_nchw(images, f"data.options.path ({path.name})")
    return InMemoryImages(torch.from_numpy(pixels), torch.from_numpy(labels.astype(np.int64)), classes=classes)


# ------------------------------------------------------------------------------------------
# extras:shapes


def _shape_mask(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A boolean ``(size, size)`` mask of one shape at a random place, scale and angle."""
    radius = rng.uniform(0.22, 0.38) * size
    margin = radius * 1.05
    cy, cx = rng.uniform(margin, size - margin, 2) if size - margin > margin else (size / 2, size / 2)
    angle = rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:size, 0:size] + 0.5
    # coordinates in the shape's own rotated frame
    u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
    v = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
    if shape == "circle":
        return u**2 + v**2 <= radius**2
    if shape == "square":
        half = radius * 0.75
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    if shape == "triangle":  # equilateral, circumradius ``radius``: inside all three edges
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            theta = 2 * np.pi * k / 3
            inside &= u * np.cos(theta) + v * np.sin(theta) <= radius / 2
        return inside
    arm = radius * 0.28  # cross
    return ((np.abs(u) <= arm) & (np.abs(v) <= radius)) | ((np.abs(v) <= arm) & (np.abs(u) <= radius))


def render_shapes(n_per_class: int, size: int, seed: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 1, size, size), labels int64 (N,))``, the same for the same arguments."""
    rng = np.random.default_rng(seed)
    images = np.empty((n_per_class * len(SHAPES), 1, size, size), dtype=np.uint8)
    labels = np.repeat(np.arange(len(SHAPES), dtype=np.int64), n_per_class)
    for index, label in enumerate(labels):
        mask = _shape_mask(SHAPES[label], size, rng)
        brightness = rng.uniform(0.6, 1.0)
        pixels = mask * brightness + rng.normal(0.0, noise, (size, size))
        images[index, 0] = np.clip(np.round(pixels * 255), 0, 255).astype(np.uint8)
    return images, labels


def load_shapes(request: DatasetRequest) -> InMemoryImages:
    """Grayscale shapes (circle, square, triangle, cross), ``n_per_class`` of each.

    Options: ``n_per_class`` (default 300), ``size`` (pixels per side, default 28), ``seed``
    (default 0; the same seed draws the same images on every machine), ``noise`` (standard
    deviation of Gaussian pixel noise, as a fraction of full brightness; default 0.1).
    """
    options = dict(request.options)
    unknown = sorted(set(options) - set(SHAPES_OPTIONS))
    if unknown:
        raise SpecError(f"data.options: extras:shapes takes {', '.join(SHAPES_OPTIONS)}; unknown: {', '.join(unknown)}")
    n_per_class, size, seed = options.get("n_per_class", 300), options.get("size", 28), options.get("seed", 0)
    noise = options.get("noise", 0.1)
    for key, value, low in (("n_per_class", n_per_class, 1), ("size", size, 8), ("seed", seed, 0)):
        if not isinstance(value, int) or value < low:
            raise SpecError(f"data.options.{key} must be an integer ≥ {low}, got {value!r}")
    if not isinstance(noise, (int, float)) or noise < 0:
        raise SpecError(f"data.options.noise must be a number ≥ 0, got {noise!r}")
    images, labels = render_shapes(n_per_class, size, seed, float(noise))
    return InMemoryImages(torch.from_numpy(images), torch.from_numpy(labels), classes=list(SHAPES))
