"""Extension points are registries that refuse duplicates: data sets (plain and ``prefix:<arg>``),
model transforms; and the shared model leaves (input size, module lookup) answer in one way."""

from __future__ import annotations

import pytest
import torch

from compress.data import DataBundle, ImageSet, list_datasets, load_data, register_dataset
from compress.errors import UserError
from compress.models import create_model, input_size_of, match_modules, register_transform, set_module


def _tiny_bundle(name: str, n: int = 12) -> DataBundle:
    x = torch.randint(0, 255, (n, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(n) % 3
    return DataBundle(name, ImageSet(x, y), ImageSet(x.clone(), y.clone()), ["a", "b", "c"])


def test_a_registered_dataset_loads_by_name_and_duplicates_are_refused():
    @register_dataset("test-three-labels")
    def _three(root=None, download=False):
        return _tiny_bundle("test-three-labels")

    bundle = load_data("test-three-labels", num_labels=2, limit_train=5)
    assert bundle.num_classes == 2 and len(bundle.train) == 5
    assert "test-three-labels" in list_datasets()
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("test-three-labels")(_three)
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("digits")(_three)


def test_a_prefixed_dataset_gets_its_argument_like_imagefolder():
    seen = {}

    @register_dataset("test-synthetic", prefix=True)
    def _synthetic(arg, *, image_size, keep, limits, seed):
        seen.update(arg=arg, limits=limits)
        return _tiny_bundle(f"test-synthetic:{arg}", n=int(arg))

    bundle = load_data("test-synthetic:9", limit_train=4)
    assert seen == {"arg": "9", "limits": (4, None)} and len(bundle.train) == 9  # the loader applies limits itself
    assert "test-synthetic:<argument>" in list_datasets() and "imagefolder:<path>" in list_datasets()
    with pytest.raises(UserError, match="unknown dataset 'test-synthetic'"):
        load_data("test-synthetic")  # the prefix alone names nothing


def test_the_transform_registry_refuses_duplicates():
    import compress.compression  # noqa: F401  (registers the built-in transforms)

    with pytest.raises(ValueError, match="transform 'prune' is already registered"):
        register_transform("prune")(lambda model, spec: model)


def test_input_size_comes_from_the_factory_for_any_library():
    tv = create_model("torchvision:resnet18", num_classes=10, img_size=48)  # torchvision declares none itself
    assert input_size_of(tv) == (3, 48, 48)
    assert input_size_of(tv, (3, 16, 16)) == (3, 16, 16)
    with pytest.raises(UserError, match="declares no input size"):
        input_size_of(torch.nn.Linear(2, 2))


def test_module_paths_and_globs_resolve_in_one_place():
    model = create_model("vgg6", width=0.125, fc_hidden=[])
    assert match_modules(model, ["features.pool*"]) == [n for n, _ in model.named_modules() if ".pool" in n]
    with pytest.raises(UserError, match=r"unknown layer 'features.pool9' \(did you mean"):
        match_modules(model, ["features.pool9"], "layer")
    set_module(model, "features.pool1", torch.nn.Identity())
    assert isinstance(model.features.pool1, torch.nn.Identity)
    with pytest.raises(UserError, match="unknown module 'features.nope'"):
        set_module(model, "features.nope", torch.nn.Identity())
