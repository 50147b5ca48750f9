"""Image transforms torchvision does not have.

Both take one ``(C, H, W)`` tensor image, as runner applies them; :class:`PerImageStandardize`
also takes a batch ``(N, C, H, W)``, because runner applies deterministic transforms to a whole
in-memory split at once.
"""

from __future__ import annotations

from typing import Any

import torch

from runner.plugin_api import SpecError


class Cutout:
    """Cutout (DeVries & Taylor, 2017): blank ``holes`` squares of ``size`` pixels at random places.

    Unlike torchvision's ``RandomErasing``, whose rectangles vary in area and aspect ratio and must
    lie inside the image, a Cutout square has a fixed size and a centre anywhere in the image, so
    it is clipped at the border and sometimes covers less: the regulariser of the paper. Put it
    after normalisation so that ``fill=0`` is the mean pixel.

    :param size: side of each square, in pixels.
    :param holes: how many squares per image.
    :param p: probability of applying it to an image.
    :param fill: the value written into the squares.
    """

    random = True  # runner must not cache its output

    def __init__(self, size: int = 8, holes: int = 1, p: float = 1.0, fill: float = 0.0) -> None:
        if not isinstance(size, int) or size < 1:
            raise SpecError(f"extras:Cutout size must be a positive integer, got {size!r}")
        if not isinstance(holes, int) or holes < 1:
            raise SpecError(f"extras:Cutout holes must be a positive integer, got {holes!r}")
        if not 0.0 <= float(p) <= 1.0:
            raise SpecError(f"extras:Cutout p must be in [0, 1], got {p!r}")
        self.size, self.holes, self.p, self.fill = size, holes, float(p), float(fill)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"extras:Cutout needs a tensor image (put it after ToImage), got {type(image).__name__}")
        if self.p < 1.0 and torch.rand(()).item() >= self.p:
            return image
        height, width = image.shape[-2:]
        out = image.clone()
        for _ in range(self.holes):
            cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
            top, left = max(cy - self.size // 2, 0), max(cx - self.size // 2, 0)
            bottom, right = min(cy - self.size // 2 + self.size, height), min(cx - self.size // 2 + self.size, width)
            out[..., top:bottom, left:right] = self.fill
        return out

    def __repr__(self) -> str:
        return f"Cutout(size={self.size}, holes={self.holes}, p={self.p}, fill={self.fill})"


class PerImageStandardize:
    """Scale each image to zero mean and unit variance over all its pixels and channels.

    As ``tf.image.per_image_standardization``: the standard deviation is floored at
    ``1 / sqrt(number of values)`` so a blank image does not divide by zero. Where
    ``Normalize`` needs the dataset's mean and std, this needs nothing, and it removes each
    image's brightness and contrast. Needs a float image (after ``ToDtype(float32, scale=true)``).
    """

    random = False

    def __call__(self, image: torch.Tensor) -> Any:
        if not isinstance(image, torch.Tensor) or not image.is_floating_point():
            raise TypeError("extras:PerImageStandardize needs a float tensor image (put it after ToDtype float32)")
        dims = (-3, -2, -1)
        values = image.shape[-3] * image.shape[-2] * image.shape[-1]
        mean = image.mean(dim=dims, keepdim=True)
        std = image.std(dim=dims, keepdim=True, unbiased=False).clamp(min=values ** -0.5)
        return (image - mean) / std

    def __repr__(self) -> str:
        return "PerImageStandardize()"
