"""Prompt templates and class names of the MTIL / continual-CLIP protocols (cilbench.models.templates)."""

from __future__ import annotations

import pytest

from cilbench.data.catalog import get_spec
from cilbench.models.templates import (CIL_TEMPLATE, CLASS_NAMES, OFFICIAL_TEMPLATE_COUNTS, RAW_NAMES, TEMPLATES,
                                       _norm, clean_class_name, clip_class_names, match_official, templates_for)

MTIL = ("aircraft", "caltech101", "cifar100", "dtd", "eurosat", "flowers", "food", "mnist", "pets", "cars", "sun397")

# ZSCL / MoE-Adapters mtil/src/datasets/collections.py (+ cifar10.py for CIFAR-100).
EXPECTED_COUNTS = {"aircraft": 2, "caltech101": 34, "cifar100": 18, "dtd": 8, "eurosat": 3, "flowers": 1, "food": 1,
                   "mnist": 1, "pets": 1, "cars": 9, "sun397": 2}


@pytest.mark.parametrize("key", MTIL)
def test_official_template_counts(key):
    assert len(TEMPLATES[key]) == EXPECTED_COUNTS[key] == OFFICIAL_TEMPLATE_COUNTS[key]


def test_every_catalog_template_key_exists():
    for name in MTIL + ("cifar100", "tinyimagenet", "imagenet-r", "imagenet-a", "cub", "objectnet", "synthetic",
                        "digits", "imagenet100", "omnibenchmark", "vtab"):
        assert get_spec(name).templates in TEMPLATES, name


def test_every_template_has_exactly_one_slot():
    for key, ensemble in TEMPLATES.items():
        assert ensemble, key
        assert len(set(ensemble)) == len(ensemble), key
        for t in ensemble:
            assert t.count("{}") == 1 and t.count("{") == 1 and t.count("}") == 1, (key, t)
            assert t.format("cat")


def test_known_strings():
    assert TEMPLATES["aircraft"][0] == "a photo of a {}, a type of aircraft."
    assert TEMPLATES["mnist"] == ('a photo of the number: "{}".',)
    assert TEMPLATES["eurosat"][0] == "a centered satellite photo of {}."
    assert TEMPLATES["cars"][0] == "a photo of a {}, a type of car."
    assert len(TEMPLATES["imagenet"]) == 80 and TEMPLATES["imagenet"][0] == "a bad photo of a {}."
    assert TEMPLATES["default"] == ("a photo of a {}.",)
    assert 1 <= len(TEMPLATES["synthetic"]) <= 3


def test_templates_for_modes():
    assert templates_for("caltech101") == TEMPLATES["caltech101"]
    assert templates_for("caltech101", "ensemble") == TEMPLATES["caltech101"]
    assert templates_for("caltech101", "first") == ("a photo of a {}.",)
    assert templates_for("dtd", "first") == ("a photo of a {} texture.",)
    assert templates_for("dtd", "cil") == (CIL_TEMPLATE,) == ("a bad photo of a {}.",)
    assert templates_for("no-such-key") == TEMPLATES["default"]
    with pytest.raises(ValueError):
        templates_for("dtd", "all")


@pytest.mark.parametrize("key", MTIL + ("tinyimagenet",))
def test_class_name_lengths_match_catalog(key):
    names = CLASS_NAMES[key]
    assert len(names) == get_spec(key).num_classes
    assert len(set(names)) == len(names)
    assert all(isinstance(n, str) and n == n.strip() and n for n in names)
    # names must stay distinguishable after normalisation, raw aliases included
    keys = [_norm(n) for n in names]
    assert len(set(keys)) == len(keys)
    if key in RAW_NAMES:
        assert len(RAW_NAMES[key]) == len(names)
        raw = [_norm(n) for n in RAW_NAMES[key]]
        assert len(set(raw)) == len(raw)


def test_official_names_spot_checks():
    assert CLASS_NAMES["eurosat"][0] == "annual crop land"
    assert CLASS_NAMES["caltech101"][:2] == ("off-center face", "centered face")
    assert CLASS_NAMES["mnist"][0] == "0 - zero"
    assert CLASS_NAMES["pets"][2] == "American Pit Bull Terrier"
    assert CLASS_NAMES["food"][16:18] == ("cheese plate", "cheesecake")  # torchvision sorts the class names
    assert CLASS_NAMES["sun397"][8] == "apartment building/outdoor"
    assert CLASS_NAMES["cars"][5] == "Acura Integra Type R 2001"  # cars_meta.mat order, not alphabetical
    assert CLASS_NAMES["aircraft"][-1] == "Yak-42"
    assert CLASS_NAMES["cifar100"][1] == "aquarium fish"
    assert CLASS_NAMES["tinyimagenet"][0] == "Egyptian Mau" and RAW_NAMES["tinyimagenet"][0] == "n02124075"


def test_clip_class_names_reorders_by_name():
    # ethz/food101 lists cheesecake before cheese_plate; names must follow the source's labels, not positions
    hub = [n.replace(" ", "_") for n in CLASS_NAMES["food"]]
    hub[16], hub[17] = hub[17], hub[16]
    out = clip_class_names("food", hub)
    assert out[16] == "cheesecake" and out[17] == "cheese plate"
    assert match_official("food", hub)[16] == 17


def test_clip_class_names_raw_aliases():
    assert clip_class_names("eurosat", ["AnnualCrop", "SeaLake"]) == ["annual crop land", "lake or sea"]
    assert clip_class_names("mnist", list("0123456789"))[3] == "3 - three"
    assert clip_class_names("pets", ["abyssinian", "american_bulldog"]) == ["Abyssinian", "American Bulldog"]
    assert clip_class_names("sun397", ["/a/apartment_building/outdoor", "jail_cell"]) == [
        "apartment building/outdoor", "jail cell"]
    # Donghyun99/Caltech-101 keeps BACKGROUND_Google as label 0: it has no official name and is only cleaned
    hub = ["BACKGROUND_Google"] + list(RAW_NAMES["caltech101"])
    out = clip_class_names("caltech101", hub)
    assert out[0] == "BACKGROUND Google" and out[1:] == list(CLASS_NAMES["caltech101"])
    assert match_official("caltech101", hub)[0] is None
    # zh-plus/tiny-imagenet names its labels by sorted WordNet ids
    wnids = sorted(RAW_NAMES["tinyimagenet"])
    out = clip_class_names("tinyimagenet", wnids)
    assert out[0] == CLASS_NAMES["tinyimagenet"][RAW_NAMES["tinyimagenet"].index(wnids[0])]


def test_clip_class_names_positional_and_fallback():
    # same length but unmatched names (e.g. integers): the official list, in the official order
    assert clip_class_names("flowers", [str(i) for i in range(102)]) == list(CLASS_NAMES["flowers"])
    # no official list: cleaning
    assert clip_class_names("cub", ["001.Black_footed_Albatross", "Laysan_Albatross"]) == [
        "001.Black footed Albatross", "Laysan Albatross"]
    assert clip_class_names("unknown", ["aquarium_fish", "/b/bow_window/indoor", "HerbaceousVegetation"]) == [
        "aquarium fish", "bow window/indoor", "Herbaceous Vegetation"]
    # official list of another length and no name match: cleaning
    assert clip_class_names("dtd", ["a_b", "c"]) == ["a b", "c"]


def test_clean_class_name():
    assert clean_class_name("  lawn_mower ") == "lawn mower"
    assert clean_class_name("/a/airplane_cabin") == "airplane cabin"
    assert clean_class_name("SeaLake") == "Sea Lake"
    assert clean_class_name("F-16A/B") == "F-16A/B"


def test_known_hub_typo_is_mapped():
    from cilbench.models.templates import CLASS_NAMES, clip_class_names

    names = [n.replace(" ", "_") for n in CLASS_NAMES["cifar100"]]
    names[names.index("crab")] = "cra"
    assert clip_class_names("cifar100", names) == list(CLASS_NAMES["cifar100"])
