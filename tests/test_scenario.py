"""Class orders and increments: the PILOT convention, the fixed published orders, the MTIL orders."""

import json

import pytest

from cilbench.data.scenario import build_scenario, increments, seeded_order
from cilbench.errors import CilbenchError


def test_seeded_orders_match_pilot_prefixes():
    assert seeded_order(100, 1993)[:10] == [68, 56, 78, 8, 23, 84, 90, 65, 74, 76]
    assert seeded_order(200, 1993)[:5] == [168, 136, 51, 9, 183]
    assert seeded_order(50, 1993)[:5] == [43, 41, 23, 14, 13]


def test_seeded_order_does_not_disturb_global_rng():
    import numpy as np

    np.random.seed(7)
    expected = np.random.rand()
    np.random.seed(7)
    seeded_order(100, 1993)
    assert np.random.rand() == expected


@pytest.mark.parametrize("n,base,inc,expected", [
    (100, 0, 10, [10] * 10),
    (100, 0, 5, [5] * 20),
    (100, 50, 10, [50, 10, 10, 10, 10, 10]),
    (100, 50, 5, [50] + [5] * 10),
    (200, 100, 20, [100] + [20] * 5),
    (200, 0, 20, [20] * 10),
    (300, 0, 30, [30] * 10),
    (10, 0, 3, [3, 3, 3, 1]),  # the remainder task
    (50, 0, 10, [10] * 5),
])
def test_increments(n, base, inc, expected):
    assert increments(n, base, inc) == expected


def test_cil_scenario_tasks_follow_the_order():
    s = build_scenario("cifar100", "B0Inc10", 1993)
    assert s.tasks[0].source_labels == (68, 56, 78, 8, 23, 84, 90, 65, 74, 76)
    assert s.tasks[0].classes == tuple(range(10))
    assert s.tasks[9].classes == tuple(range(90, 100))
    assert sorted(c for t in s.tasks for c in t.source_labels) == list(range(100))


def test_fixed_orders():
    s = build_scenario("cifar100", "B0Inc10", 1993, "cifar100-icarl")
    assert s.tasks[0].source_labels[:5] == (87, 0, 52, 58, 44)
    t = build_scenario("tinyimagenet", "B100Inc20", 1993, "tinyimagenet-zscl")
    assert t.class_order[:3] == [131, 181, 22]
    assert t.increments == [100, 20, 20, 20, 20, 20]
    with pytest.raises(CilbenchError, match="is for cifar100"):
        build_scenario("imagenet-r", "B0Inc20", 1993, "cifar100-icarl")
    with pytest.raises(CilbenchError, match="did you mean 'cifar100-icarl'"):
        build_scenario("cifar100", "B0Inc10", 1993, "cifar100-icarll")


def test_mtil_orders():
    one = build_scenario("mtil", mtil_order="I")
    assert [t.dataset for t in one.tasks] == ["aircraft", "caltech101", "cifar100", "dtd", "eurosat", "flowers",
                                              "food", "mnist", "pets", "cars", "sun397"]
    two = build_scenario("mtil", mtil_order="II")
    assert [t.dataset for t in two.tasks][:3] == ["cars", "food", "mnist"]
    assert two.tasks[1].classes[0] == 196  # global ids concatenate the label spaces
    assert one.num_classes == two.num_classes == 100 + 101 + 100 + 47 + 10 + 102 + 101 + 10 + 37 + 196 + 397


@pytest.mark.parametrize("scenario,message", [
    ("B0Inc0", "increment must be at least 1"),
    ("Inc10", "malformed scenario"),
    ("B0Inc10x", "malformed scenario"),
    ("B200Inc10", "does not fit a dataset of 100 classes"),
    ("B0Inc101", "does not fit"),
])
def test_bad_scenarios(scenario, message):
    with pytest.raises(CilbenchError, match=message):
        build_scenario("cifar100", scenario)


def test_split_command_json(cli):
    r = cli("datasets", "split", "cifar100", "--scenario", "B0Inc10", "--seed", "1993", "--json")
    assert r.code == 0, r.err
    out = json.loads(r.out)
    assert out["dataset"] == "cifar100" and out["num_classes"] == 100
    assert out["class_order"][:3] == [68, 56, 78]
    assert out["increments"] == [10] * 10
    assert out["tasks"][0] == [68, 56, 78, 8, 23, 84, 90, 65, 74, 76]
    r = cli("datasets", "split", "cifar100", "--scenario", "B50Inc10", "--class-order", "cifar100-icarl", "--json")
    assert json.loads(r.out)["tasks"][0][:5] == [87, 0, 52, 58, 44]
    r = cli("datasets", "split", "mtil", "--order", "II", "--json")
    assert json.loads(r.out)["datasets"][-1] == "cifar100"


def test_split_command_errors_are_one_line(cli):
    r = cli("datasets", "split", "cifar10", "--scenario", "B0Inc10")
    assert r.code != 0 and "did you mean 'cifar100'" in r.err and "Traceback" not in r.err
    r = cli("datasets", "split", "cifar100", "--scenario", "B0Inc")
    assert r.code != 0 and "malformed scenario" in r.err and len(r.err.strip().splitlines()) == 1


def test_vtab_keeps_the_official_order_one_domain_per_task(cli):
    """Every official VTAB config (RevisitingCIL exps/*/vtab_10_10_*.json, EASE exps/ease_vtab*.json) sets
    "shuffle": false: classes keep the order 0..49, so task t is domain t (resisc45, dtd, pets, eurosat, flowers)."""
    from cilbench.data.catalog import get_spec

    spec = get_spec("vtab")
    width = spec.parts[0].first_classes
    domain_of = [d for d, part in enumerate(spec.parts) for _ in range(part.first_classes)]
    r = cli("datasets", "split", "vtab", "--json")
    assert r.code == 0, r.err
    out = json.loads(r.out)
    assert out["class_order"] == list(range(50)) and out["class_order_name"] == "identity"
    assert out["increments"] == [width] * 5
    assert [sorted({domain_of[c] for c in task}) for task in out["tasks"]] == [[0], [1], [2], [3], [4]]
    # still overridable: the seeded permutation mixes the domains
    r = cli("datasets", "split", "vtab", "--class-order", "seed", "--json")
    mixed = json.loads(r.out)
    assert mixed["class_order"][:5] == [43, 41, 23, 14, 13]
    assert any(len({domain_of[c] for c in task}) > 1 for task in mixed["tasks"])
    # other datasets keep the seeded permutation by default
    assert build_scenario("cub", "B0Inc10").class_order == seeded_order(200, 1993)


def test_tinyimagenet_zscl_order_is_mapped_to_the_store_label_space():
    """continuum numbers TinyImageNet classes in wnids.txt order; the hub copy sorts the WordNet ids."""
    from cilbench.data.scenario import fixed_orders

    wnids = fixed_orders()["tinyimagenet-zscl"]["label_space"]
    s = build_scenario("tinyimagenet", "B100Inc20", 1993, "tinyimagenet-zscl")
    first = s.class_order[0]  # 131 in continuum's space
    assert s.tasks[0].source_labels[0] == sorted(wnids).index(wnids[first])
    assert sorted(c for t in s.tasks for c in t.source_labels) == list(range(200))
    described = s.describe()
    assert described["tasks"][0][:3] == [131, 181, 22] and "store_tasks" in described
