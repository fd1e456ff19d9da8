"""Image files to pixels, the same way for training data (:mod:`compress.data`) and deployment
(:mod:`compress.deploy.predict`): any file Pillow reads becomes an 8-bit RGB (or grey) array, or a
one-line :class:`~compress.errors.UserError` naming the file.

- 16-bit and 32-bit integer images are scaled to 8 bits (not clipped to white), float images
  taken as 0..1 or 0..255;
- palette, grey and CMYK images are converted; transparency (RGBA, LA, a palette or grey image
  with a transparent colour) is composited on white, so the hidden colour of transparent pixels
  never shows;
- an image of more than :data:`MAX_PIXELS` pixels (a "decompression bomb": a small file that
  decodes to gigabytes) is refused before it is decoded.

A leaf: numpy, Pillow and :mod:`compress.errors` only (no PyTorch).
"""

from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from compress.errors import UserError

__all__ = ["decode_image", "to_mode", "check_same_size", "check_fits_memory", "MAX_PIXELS"]

MAX_PIXELS = 89_478_485  # Pillow's own warning threshold (about 9,459 x 9,459)

_INT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
# what Pillow's decoders raise on damaged or hostile files besides OSError
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, TypeError, KeyError,
                  ZeroDivisionError)


def to_mode(im: Any, mode: str) -> Any:
    """``im`` (a PIL image) as an 8-bit ``"RGB"`` or ``"L"`` image (see the module docstring)."""
    from PIL import Image

    if im.mode in _INT_MODES or im.mode == "F":
        a = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        top = float(a.max()) if a.size else 0.0
        if im.mode == "F":
            scale = 255.0 if top <= 1.0 else 1.0
        else:
            scale = 1 / 257 if im.mode.startswith("I;16") or top > 255 else 1.0
        im = Image.fromarray(np.clip(np.round(a * scale), 0, 255).astype(np.uint8), "L")
    elif im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return im if im.mode == mode else im.convert(mode)


def decode_image(path: str | os.PathLike, channels: int = 3, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read an image file as ``(H, W, channels)`` uint8 pixels (RGB, or grey for one channel),
    resized (bilinear) to ``size = (width, height)`` when given.

    Raises:
        UserError: the file is missing, not an image Pillow can decode, damaged, or a
            decompression bomb; the message names it.
    """
    from PIL import Image, UnidentifiedImageError

    name = repr(str(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
                if width * height > MAX_PIXELS:
                    raise Image.DecompressionBombError(f"{width}x{height}")
                im = to_mode(im, "L" if channels == 1 else "RGB")
                if size is not None and im.size != tuple(size):
                    im = im.resize(tuple(size), Image.BILINEAR)
                pixels = np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise UserError(f"image file {name} does not exist") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"image file {name} is too large to decode (more than {MAX_PIXELS:,} pixels: a "
                        f"decompression bomb or a huge image); resize it or remove it") from None
    except UnidentifiedImageError:
        raise UserError(f"image file {name} cannot be decoded (not an image format Pillow reads); remove or "
                        f"replace it") from None
    except _DECODE_ERRORS as e:
        raise UserError(f"image file {name} cannot be decoded ({e.__class__.__name__}: it is damaged or "
                        f"truncated); remove or replace it") from None
    return pixels.reshape(pixels.shape[0], pixels.shape[1], channels)


def check_same_size(arrays: Sequence[np.ndarray], files: Sequence[Path], where: str) -> None:
    """Images kept at their own size must share one square size; else the sizes found are
    listed (with an example file each) and ``--image-size`` suggested.

    Raises:
        UserError: the sizes differ or are not square.
    """
    found: dict[tuple[int, int], list[Path]] = {}
    for a, f in zip(arrays, files):
        found.setdefault((a.shape[1], a.shape[0]), []).append(Path(f))
    if len(found) > 1:
        shown = ", ".join(f"{w}x{h} ({len(fs)} image{'s' if len(fs) > 1 else ''}, e.g. {fs[0].name!r})"
                          for (w, h), fs in sorted(found.items(), key=lambda kv: -len(kv[1]))[:4])
        more = f" and {len(found) - 4} other sizes" if len(found) > 4 else ""
        raise UserError(f"images in {where!r} differ in size: {shown}{more}; pass --image-size N to resize every "
                        f"image to NxN")
    if found:
        (w, h), _ = next(iter(found.items()))
        if w != h:
            raise UserError(f"images in {where!r} are {w}x{h} (width x height), not square; pass --image-size N to "
                            f"resize them to NxN")


def check_fits_memory(count: int, side: int, where: str) -> None:
    """Refuse ``count`` RGB images of ``side`` x ``side`` pixels that would not fit in this
    machine's memory once decoded (more than 80 % of it)."""
    need = count * side * side * 3
    try:
        have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    if need > 0.8 * have:
        raise UserError(f"{count:,} images of {side}x{side} in {where!r} need {need / 2**30:.1f} GiB in memory, "
                        f"more than this machine has ({have / 2**30:.1f} GiB); pass a smaller --image-size or "
                        f"--limit-train/--limit-test")
