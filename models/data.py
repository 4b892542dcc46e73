"""Images for the LIC models: the embedded default (scikit-image's bundled colour photographs)
and a real image-folder loader (PNG/JPEG: Kodak, CLIC, Vimeo frames ...), plus a seeded
random-crop sampler whose state can be saved and restored (resumable training).

Pixels are ``uint8`` ``p`` everywhere; a network sees ``p / 256`` (DESIGN.md number format),
so the model input is exactly representable as unsigned 8-bit fixed point at ``2**-8``.

Embedded split (fixed, documented in the README):

    held-out  astronaut (512x512), chelsea (300x451), coffee (400x600)
    training  rocket (427x640), motorcycle_left / motorcycle_right (500x741, the two views
              of ``stereo_motorcycle``), hubble_deep_field (872x1000),
              immunohistochemistry (512x512), retina (1411x1411)

Only images shipped inside the scikit-image wheel are used (no pooch download).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["psnr_from_mse", "EMBEDDED_TRAIN", "EMBEDDED_HELD_OUT", "embedded_images", "folder_images", "load_split",
           "read_rgb", "to_tensor", "CropSampler", "DataError", "IMAGE_SUFFIXES"]

EMBEDDED_TRAIN = ("rocket", "motorcycle_left", "motorcycle_right", "hubble_deep_field",
                  "immunohistochemistry", "retina")
EMBEDDED_HELD_OUT = ("astronaut", "chelsea", "coffee")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class DataError(ValueError):
    """Unusable image data; the message names the file or directory and the fix."""


def _skimage(name: str) -> np.ndarray:
    import skimage.data as d

    if name.startswith("motorcycle_"):
        left, right, _ = d.stereo_motorcycle()
        img = left if name.endswith("left") else right
    else:
        img = getattr(d, name)()
    return np.ascontiguousarray(img[..., :3], dtype=np.uint8)


def embedded_images(split: str) -> dict[str, np.ndarray]:
    """The embedded default's ``"train"`` or ``"held-out"`` images, name -> uint8 (H, W, 3)."""
    names = {"train": EMBEDDED_TRAIN, "held-out": EMBEDDED_HELD_OUT}.get(split)
    if names is None:
        raise DataError(f"split must be 'train' or 'held-out', not {split!r}")
    return {n: _skimage(n) for n in names}


def read_rgb(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """The image file ``path`` as uint8 (H, W, 3) RGB, the only pixels the codec and its training
    take, turned upright by its EXIF orientation tag where it has one.  8-bit modes (grey, palette,
    RGB, CMYK ...) are converted by Pillow; 16-bit grey is scaled to 8 bits
    (``round(v * 255 / 65535)``), where Pillow's conversion would clip every value above 255 to white.
    :class:`DataError` names the file where it cannot be read, has more than ``max_pixels`` pixels
    (checked before its pixels are decoded), holds 32-bit integer or float samples, or has
    transparent pixels (coding RGB would drop them silently)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            if max_pixels is not None and opened.width * opened.height > max_pixels:
                raise DataError(f"{path}: {opened.width}x{opened.height} has more than the {max_pixels} pixels a "
                                f"licforge file holds; crop or scale it down")
            im = ImageOps.exif_transpose(opened)  # a camera's EXIF orientation: the pixels as viewers show them
            if im.mode.startswith("I;16"):
                v = np.asarray(im, dtype=np.float64)
                return np.repeat(np.rint(v * (255 / 65535)).astype(np.uint8)[..., None], 3, axis=2)
            if im.mode in ("I", "F"):
                raise DataError(f"{path}: {'32-bit integer' if im.mode == 'I' else 'floating-point'} samples; "
                                f"save it as 8-bit RGB (or 16-bit grey)")
            if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
                alpha = np.asarray(im.convert("RGBA"))[..., 3]
                if (alpha < 255).any():
                    raise DataError(f"{path}: {int((alpha < 255).sum())} transparent pixels (alpha below 255); "
                                    f"licforge codes RGB: flatten the image onto a background first")
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: not a readable PNG/JPEG image ({e}); remove or replace it") from None


def folder_images(folder: str | Path, split: str) -> dict[str, np.ndarray]:
    """Images of a folder, file stem -> uint8 (H, W, 3).

    ``folder/train`` and ``folder/test`` subfolders, when present, are the split (put Kodak in
    ``test/``).  Otherwise the PNG/JPEG files of ``folder``, sorted by name, are split
    deterministically: every 8th file (the 8th, 16th, ...) is held out, the rest train.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"--data {root}: not a directory of PNG/JPEG images")
    if split not in ("train", "held-out"):
        raise DataError(f"split must be 'train' or 'held-out', not {split!r}")
    sub = root / ("train" if split == "train" else "test")
    if (root / "train").is_dir() and (root / "test").is_dir():
        files = sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        every = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        held = {i for i in range(len(every)) if i % 8 == 7}
        files = [p for i, p in enumerate(every) if (i in held) == (split == "held-out")]
    if not files:
        if (root / "train").is_dir() and (root / "test").is_dir():
            raise DataError(f"--data {root}: no PNG/JPEG images in {sub}")
        raise DataError(f"--data {root}: " + (f"{len(every)} PNG/JPEG image(s), too few to hold any out (every 8th "
                                              f"file is held out): give at least 8, or train/ and test/ subfolders"
                                              if every else "no PNG/JPEG images"))
    return {p.stem: read_rgb(p) for p in files}


def load_split(data: str | Path | None, split: str) -> dict[str, np.ndarray]:
    """``folder_images(data, split)``, or the embedded default when ``data`` is None."""
    return embedded_images(split) if data is None else folder_images(data, split)


def to_tensor(img: np.ndarray) -> Tensor:
    """uint8 (H, W, 3) pixels -> float (1, 3, H, W) tensor of ``p / 256``."""
    return torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1)[None].float() / 256.0


@dataclass
class CropSampler:
    """Random ``crop`` x ``crop`` patches, ``batch`` per call, with random horizontal flips.

    An image is drawn uniformly, then a position uniformly inside it; the torch Generator
    seeded with ``seed`` is the only randomness, and :meth:`state` / :meth:`restore` save and
    restore it, so a resumed run sees exactly the crops an uninterrupted run would.

    ``device``: where the images live and the crops are cut.  The images are moved there once,
    as uint8 (``H * W * 3`` bytes each: the whole training set must fit in the device's
    memory next to the model); every call then slices and flips on the device, with no
    host-to-device copy of a batch.  The random draws stay on a CPU generator (a few integers
    per crop), in the same order on every device, so a sampler on ``cuda`` yields the crops
    of a sampler on ``cpu`` with the same seed, and its :meth:`state` is the same.

    ``part=(rank, world)`` (distributed training): every process draws the whole global
    batch's random numbers from the same seeded generator and cuts only its slice, crops
    ``rank * batch / world`` up to ``(rank + 1) * batch / world``, so ``world`` processes
    together see exactly the batch of one process.
    """
    images: dict[str, np.ndarray]
    crop: int
    batch: int
    seed: int = 0
    device: str | torch.device = "cpu"

    def __post_init__(self) -> None:
        if not self.images:
            raise DataError("no training images")
        small = [n for n, im in self.images.items() if min(im.shape[:2]) < self.crop]
        if small:
            raise DataError(f"images {small} are smaller than --crop {self.crop}; use a smaller crop")
        self._device = torch.device(self.device)
        self._tensors = [torch.from_numpy(np.array(im, copy=True)).permute(2, 0, 1).to(self._device)
                         for im in self.images.values()]
        self._targets: list[Tensor] | None = None
        self._gen = torch.Generator().manual_seed(self.seed)

    def state(self) -> Tensor:
        """The generator state (a uint8 tensor; saved in checkpoints)."""
        return self._gen.get_state()

    def restore(self, state: Tensor) -> None:
        """Continue from a :meth:`state`."""
        self._gen.set_state(state)

    def attach_targets(self, targets: list[Tensor]) -> None:
        """Per-image tensors cut with the images: ``targets[i]`` (C, H, W), the H x W of image
        ``i`` (e.g. a frozen teacher's reconstruction of the whole image), moved to ``device``;
        :meth:`sample` then returns their crops beside the images' (same positions and flips)."""
        if len(targets) != len(self._tensors):
            raise ValueError(f"{len(targets)} targets for {len(self._tensors)} images")
        for (name, im), t in zip(self.images.items(), targets):
            if tuple(t.shape[1:]) != im.shape[:2]:
                raise ValueError(f"target of image {name!r} is {tuple(t.shape[1:])}, the image {im.shape[:2]}")
        self._targets = [t.to(self._device) for t in targets]

    @property
    def has_targets(self) -> bool:
        """Whether :meth:`attach_targets` gave this sampler targets."""
        return self._targets is not None

    def __call__(self, part: tuple[int, int] | None = None) -> Tensor:
        """A float (batch, 3, crop, crop) tensor of ``p / 256`` on ``device``; with
        ``part=(rank, world)`` the ``batch / world`` crops of that process (see the class doc)."""
        return self.sample(part)[0]

    def sample(self, part: tuple[int, int] | None = None) -> tuple[Tensor, Tensor | None]:
        """(the crops of :meth:`__call__`, the same crops of the attached targets or None)."""
        targets = self._targets
        lo, hi = 0, self.batch
        if part is not None:
            rank, world = part
            if world < 1 or not 0 <= rank < world or self.batch % world:
                raise ValueError(f"part {part}: the batch of {self.batch} does not split into {world} equal parts")
            lo, hi = rank * self.batch // world, (rank + 1) * self.batch // world
        out = torch.empty((hi - lo, 3, self.crop, self.crop), dtype=torch.uint8, device=self._device)
        tout = None if targets is None else torch.empty((hi - lo, targets[0].shape[0], self.crop, self.crop),
                                                        dtype=targets[0].dtype, device=self._device)
        idx = torch.randint(len(self._tensors), (self.batch,), generator=self._gen)
        for b, i in enumerate(idx.tolist()):
            im = self._tensors[i]
            top = int(torch.randint(im.shape[1] - self.crop + 1, (1,), generator=self._gen))
            left = int(torch.randint(im.shape[2] - self.crop + 1, (1,), generator=self._gen))
            flip = bool(torch.randint(2, (1,), generator=self._gen))
            if lo <= b < hi:
                patch = im[:, top:top + self.crop, left:left + self.crop]
                out[b - lo] = patch.flip(-1) if flip else patch
                if tout is not None:
                    tpatch = targets[i][:, top:top + self.crop, left:left + self.crop]
                    tout[b - lo] = tpatch.flip(-1) if flip else tpatch
        return out.float() / 256.0, None if tout is None else tout.float()


def psnr_from_mse(mse: float) -> float:
    """PSNR in dB of a mean squared error on the 0..255 pixel scale: ``10 log10(255^2 / MSE)``
    (``inf`` for an exact reconstruction)."""
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)
