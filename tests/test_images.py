"""Image files of every kind become the right 8-bit RGB (or grey) pixels, the same for training
data and deployment, or one error naming the file."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from compress.errors import UserError
from compress.images import decode_image


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    a = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "deep.png")  # a 16-bit PNG
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert decode_image(tmp_path / "deep.png")[0, :, 0].tolist() == [0, 128, 255]
    assert decode_image(tmp_path / "deep.png", channels=1).shape == (1, 3, 1)


def test_float_images_in_0_1_are_scaled(tmp_path):
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F").save(tmp_path / "f.tiff")
    assert decode_image(tmp_path / "f.tiff")[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparent_pixels_are_white_and_opaque_ones_kept(mode, tmp_path):
    im = Image.new(mode, (2, 1))
    im.putpixel((0, 0), (10, 20, 30, 0) if mode == "RGBA" else (10, 0))  # hidden colour under alpha 0
    im.putpixel((1, 0), (10, 20, 30, 255) if mode == "RGBA" else (10, 255))
    im.save(tmp_path / "t.png")
    px = decode_image(tmp_path / "t.png")
    assert px[0, 0].tolist() == [255, 255, 255]
    assert px[0, 1].tolist() == ([10, 20, 30] if mode == "RGBA" else [10, 10, 10])


def test_a_palette_with_a_transparent_colour_is_composited(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    im.save(tmp_path / "p.png", transparency=0)
    assert decode_image(tmp_path / "p.png")[0].tolist() == [[255, 255, 255], [200, 0, 0]]


def test_cmyk_and_palette_become_rgb(tmp_path):
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)  # red
    px = decode_image(tmp_path / "c.jpg")
    assert px.shape == (4, 4, 3) and px[0, 0, 0] > 200 and px[0, 0, 1] < 60
    Image.new("RGB", (3, 3), (1, 2, 3)).convert("P").save(tmp_path / "p.gif")
    assert decode_image(tmp_path / "p.gif", size=(5, 4)).shape == (4, 5, 3)


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path):
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path = tmp_path / "bomb.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 60_000, 60_000, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 99)) + chunk(b"IEND", b""))
    with pytest.raises(UserError, match="bomb.png' is too large to decode"):
        decode_image(path)


def test_damaged_and_missing_files_name_the_file(tmp_path):
    Image.new("RGB", (64, 64), (5, 6, 7)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cut.png' cannot be decoded"):
        decode_image(tmp_path / "cut.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(UserError, match="text.png' cannot be decoded"):
        decode_image(tmp_path / "text.png")
    with pytest.raises(UserError, match="nope.png' does not exist"):
        decode_image(tmp_path / "nope.png")


def test_an_image_folder_of_mixed_modes_is_read_as_rgb(tmp_path):
    from compress.data import load_data

    modes = ["L", "RGBA", "P", "RGB", "LA", "CMYK", "I;16"]
    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for m in modes:
                name = "cmyk.jpg" if m == "CMYK" else f"{m.replace(';', '')}.png"
                color = 60 if m in ("L", "P", "I;16") else (60,) * len(m)
                Image.new(m, (8, 8), color).save(tmp_path / split / c / name)
    bundle = load_data(f"imagefolder:{tmp_path}", image_size=32)
    assert bundle.train.images.shape == (14, 3, 32, 32) and bundle.input_size == (3, 32, 32)
