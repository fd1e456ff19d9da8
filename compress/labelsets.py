"""Label subsets for CIFAR-K: the CIFAR-100 superclasses, shipped as data, and the nested draws of K labels.

The second paper (Meir, Tzach et al., Supplementary, "Explanations for Figure 3") draws the K
labels of CIFAR-K/100 so that "the subset for the lowest value of K labels were randomly chosen
and then for progressively increasing K the previous K labels were included ... The K labels were
chosen uniformly from the 20 super-classes of the dataset". :func:`nested_label_order` does that
with ``groups``: it walks the superclasses in rounds, each round in a new random order, taking one
label not taken yet from each, so the first K labels of the order come from K distinct
superclasses for K <= 20, from every superclass two for K = 40, and in general from each
superclass ``floor(K / 20)`` or ``ceil(K / 20)`` labels; the labels of K are inside those of any
larger K (the same order, cut longer). Without groups the order is a plain seeded permutation
(the draw of CIFAR-K/10 and of every other data set).

A leaf: it imports nothing from the rest of the package but the error type.
"""

from __future__ import annotations

from typing import Sequence

import torch

from compress.errors import UserError

__all__ = ["CIFAR100_SUPERCLASSES", "CIFAR100_FINE_LABELS", "superclass_groups", "nested_label_order",
           "choose_labels", "superclass_of"]

# The standard CIFAR-100 coarse labels (Krizhevsky, "Learning Multiple Layers of Features from Tiny
# Images", 2009; the dataset's page lists the same 20 superclasses of 5 fine labels each), with the
# fine labels as torchvision and the dataset's meta file spell them.
CIFAR100_SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}

# The 100 fine labels in the dataset's own (alphabetical) order: label index i is CIFAR-100's class i.
CIFAR100_FINE_LABELS: tuple[str, ...] = tuple(sorted(n for names in CIFAR100_SUPERCLASSES.values() for n in names))


def _key(name: str) -> str:
    return str(name).strip().lower().replace(" ", "_").replace("-", "_")


_SUPERCLASS_OF = {_key(fine): coarse for coarse, names in CIFAR100_SUPERCLASSES.items() for fine in names}


def superclass_of(label: str) -> str | None:
    """The CIFAR-100 superclass of a fine label name (spaces, hyphens and case ignored), or None."""
    return _SUPERCLASS_OF.get(_key(label))


def superclass_groups(label_names: Sequence[str]) -> list[list[int]] | None:
    """The indices of ``label_names`` grouped by CIFAR-100 superclass (in the order of
    :data:`CIFAR100_SUPERCLASSES`), when the names are exactly the 100 CIFAR-100 fine labels in any
    order (torchvision's ``CIFAR100.classes``, or image folders named after them); else None."""
    keys = [_key(n) for n in label_names]
    if len(keys) != len(_SUPERCLASS_OF) or set(keys) != set(_SUPERCLASS_OF):
        return None
    return [[i for i, k in enumerate(keys) if _SUPERCLASS_OF[k] == coarse] for coarse in CIFAR100_SUPERCLASSES]


def nested_label_order(total: int, seed: int = 0, groups: Sequence[Sequence[int]] | None = None) -> list[int]:
    """All ``total`` labels in the seeded order whose first K are the draw of K labels.

    Without ``groups``: ``torch.randperm(total)`` under ``seed`` (the draw this package always
    made). With ``groups`` (a partition of ``range(total)``, e.g. :func:`superclass_groups`):
    round after round, the groups in a new random order, one label not taken yet from each group
    that has one left, so every prefix spreads its labels over the groups as evenly as possible.
    """
    g = torch.Generator().manual_seed(int(seed))
    if groups is None:
        return torch.randperm(total, generator=g).tolist()
    flat = sorted(i for grp in groups for i in grp)
    if flat != list(range(total)):
        raise UserError(f"the label groups do not partition the {total} labels (each label in exactly one group)")
    left = [[grp[i] for i in torch.randperm(len(grp), generator=g).tolist()] for grp in groups]
    order: list[int] = []
    while len(order) < total:
        for j in torch.randperm(len(left), generator=g).tolist():
            if left[j]:
                order.append(left[j].pop(0))
    return order


def choose_labels(total: int, k: int, seed: int = 0, groups: Sequence[Sequence[int]] | None = None) -> list[int]:
    """K of ``total`` labels chosen at random but nested: the labels for K are inside those for
    K' > K under the same seed (sorted). ``groups``: spread them over these groups (superclasses)
    as evenly as possible (:func:`nested_label_order`)."""
    if not 1 <= k <= total:
        raise UserError(f"number of labels K={k} is outside 1..{total} for this dataset")
    return sorted(nested_label_order(total, seed, groups)[:k])
