"""The layer plan on its own: coverage, proportionality, fit checks, serialisation."""

import json

import pytest

from turbocluster.runtime.cluster.plan import NodeSpec, Plan, PlanError, kv_bytes, make_plan, split_counts

MiB = 1 << 20
DESC = {
    "name": "toy",
    "identity": "ab" * 32,
    "num_layers": 30,
    "hidden_size": 576,
    "num_kv_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "layer_bytes": [3 * MiB] * 30,
    "embed_bytes": 15 * MiB,
    "head_bytes": 1 * MiB,
}


def nodes(*free_mib):
    return [NodeSpec(f"n{i}", f"10.0.0.{i}:7070", f * MiB) for i, f in enumerate(free_mib)]


def covered(plan):
    return [layer for a in plan.assignments for layer in range(a.start, a.end)]


@pytest.mark.parametrize("free", [(1000,), (1000, 1000), (1000, 500, 250), (300, 300, 300, 300, 300)])
def test_plan_covers_every_layer_exactly_once_in_order(free):
    plan = make_plan(nodes(*free), DESC, context=1024)
    assert covered(plan) == list(range(30))
    assert [a.node for a in plan.assignments] == [f"n{i}" for i in range(len(free))]


def test_layers_are_proportional_to_free_memory():
    plan = make_plan(nodes(2000, 1000), DESC, context=512)
    assert [a.layers for a in plan.assignments] == [20, 10]
    plan = make_plan(nodes(1000, 1000, 1000), DESC, context=512)
    assert [a.layers for a in plan.assignments] == [10, 10, 10]


def test_measured_speed_wins_over_memory_when_every_node_has_one():
    specs = nodes(1000, 1000)
    specs[0].speed, specs[1].speed = 1.0, 2.0
    assert [a.layers for a in make_plan(specs, DESC).assignments] == [10, 20]


def test_split_counts_keeps_at_least_one_layer_per_node():
    assert split_counts(5, [1000, 1, 1]) == [3, 1, 1]
    assert sum(split_counts(31, [3, 3, 3])) == 31


def test_too_many_nodes_is_an_error():
    with pytest.raises(PlanError, match="31 nodes but only 30 layers"):
        make_plan(nodes(*([1000] * 31)), DESC)


def test_node_that_cannot_hold_its_share_is_named_with_the_shortfall():
    with pytest.raises(PlanError, match=r"node n1 \(10\.0\.0\.1:7070\) needs .* short by"):
        make_plan(nodes(1000, 2), DESC, context=1024)


def test_kv_for_the_context_counts_against_the_node():
    fp16 = kv_bytes(15, 3, 64, 100_000)
    assert fp16 == 15 * 3 * 100_096 * 2 * 64 * 2
    turbo = kv_bytes(15, 3, 64, 100_000, {"k_bits": 3, "v_bits": 3})
    assert turbo < fp16 / 3
    with pytest.raises(PlanError, match="KV"):
        make_plan(nodes(800, 800), DESC, context=100_000)
    make_plan(nodes(800, 800), DESC, context=100_000, cache={"k_bits": 3, "v_bits": 3})


def test_plan_round_trips_through_json_and_prints_a_table():
    plan = make_plan(nodes(1000, 500), DESC, context=2048, model="toy")
    back = Plan.from_dict(json.loads(plan.to_json()))
    assert back == plan
    table = plan.table()
    assert "n0" in table and "0:20" in table and "20:30" in table and "context 2048" in table


def test_check_rejects_gaps_and_overlaps():
    plan = make_plan(nodes(1000, 1000), DESC)
    plan.assignments[1].start = 16
    with pytest.raises(PlanError, match="starting at 15"):
        plan.check()
