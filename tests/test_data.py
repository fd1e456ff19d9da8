"""Datasets: the embedded digits, nested CIFAR-K subsets, image folders, augmentation."""

import numpy as np
import pytest
import torch
from PIL import Image

from compress.data import augment, choose_labels, load_data
from compress.errors import UserError


def test_digits_shapes_and_fixed_split(digits):
    assert digits.input_size == (3, 32, 32)
    assert digits.train.images.dtype == torch.uint8
    assert len(digits.train) + len(digits.test) == 1797
    again = load_data("digits")
    assert torch.equal(again.test.labels, digits.test.labels)
    x = digits.normalize(digits.train.images[:8])
    assert x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize("k", [3, 6, 8])
def test_subset_has_exactly_k_labels_remapped(k):
    b = load_data("digits", num_labels=k)
    assert b.num_classes == k
    assert sorted(b.train.labels.unique().tolist()) == list(range(k))
    assert sorted(b.test.labels.unique().tolist()) == list(range(k))


def test_subsets_are_nested():
    for small, big in [(3, 6), (6, 8), (8, 10)]:
        assert set(choose_labels(10, small)) <= set(choose_labels(10, big))
    b3, b6 = load_data("digits", num_labels=3), load_data("digits", num_labels=6)
    assert set(b3.label_names) <= set(b6.label_names)


def test_k_larger_than_labels_is_refused():
    with pytest.raises(UserError, match="K=11 is outside 1..10"):
        load_data("digits", num_labels=11)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(UserError, match=r"unknown dataset 'cifar11'.*valid: .*cifar10.*digits"):
        load_data("cifar11")


def test_augment_flips_and_shifts_within_bounds():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    out = augment(x, torch.Generator().manual_seed(0), shift=2)
    assert out.shape == x.shape
    zero_shift = augment(x, torch.Generator().manual_seed(0), shift=0)
    for n in range(2):  # with no shift every image is itself or its mirror
        assert torch.equal(zero_shift[n], x[n]) or torch.equal(zero_shift[n], x[n].flip(2))


def _write_folder(root, classes=("cat", "dog"), per_class=3, size=12, modes=("RGB",)):
    for split in ("train", "test"):
        for ci, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                mode = modes[i % len(modes)]
                arr = np.full((size, size, 4 if mode == "RGBA" else 3), 40 * ci + i, dtype=np.uint8)
                img = Image.fromarray(arr if mode != "L" else arr[..., 0], mode if mode != "RGB" else None)
                img.save(d / f"{i}.png")


def test_imagefolder_reads_mixed_modes(tmp_path):
    _write_folder(tmp_path, modes=("RGB", "L", "RGBA"))
    b = load_data(f"imagefolder:{tmp_path}")
    assert b.label_names == ["cat", "dog"]
    assert b.train.images.shape == (6, 3, 12, 12)
    b = load_data(f"imagefolder:{tmp_path}", image_size=8)
    assert b.test.images.shape[-1] == 8


def test_imagefolder_errors(tmp_path):
    _write_folder(tmp_path)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match="notes.txt' is not an image file"):
        load_data(f"imagefolder:{tmp_path}")
    (tmp_path / "train" / "cat" / "notes.txt").unlink()
    (tmp_path / "train" / "bird").mkdir()
    (tmp_path / "test" / "bird").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        load_data(f"imagefolder:{tmp_path}")
    with pytest.raises(UserError, match="needs a train/"):
        load_data(f"imagefolder:{tmp_path / 'nope'}")
