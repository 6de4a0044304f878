"""Address allocation: pool carving, host numbers, exhaustion."""

from __future__ import annotations

import ipaddress

import pytest

from control.alloc import AddressPlan, PoolExhausted


def test_default_plan_matches_design() -> None:
    plan = AddressPlan()
    first = plan.first_free_subnet([])
    assert str(first) == "100.64.0.0/24"
    assert str(plan.agent_address(first)) == "100.64.0.100"
    assert str(plan.gateway_address(first, 1)) == "100.64.0.1"
    assert str(plan.gateway_address(first, 2)) == "100.64.0.2"
    assert plan.subnet_count == 2 ** (24 - 10)
    assert plan.max_gateways == 99


def test_first_free_fills_holes() -> None:
    plan = AddressPlan("10.200.0.0/22", 24)
    used = ["10.200.0.0/24", "10.200.2.0/24"]
    assert str(plan.first_free_subnet(used)) == "10.200.1.0/24"
    assert str(plan.first_free_subnet([*used, "10.200.1.0/24"])) == "10.200.3.0/24"
    with pytest.raises(PoolExhausted, match="no free /24"):
        plan.first_free_subnet([f"10.200.{i}.0/24" for i in range(4)])


def test_gateway_slots() -> None:
    plan = AddressPlan()
    assert plan.first_free_slot([]) == 1
    assert plan.first_free_slot([1, 2, 4]) == 3
    with pytest.raises(PoolExhausted):
        plan.first_free_slot(range(1, 100))
    with pytest.raises(ValueError):
        plan.gateway_address(plan.subnet(0), 100)


def test_other_prefixes_and_ipv6() -> None:
    plan = AddressPlan("100.64.0.0/16", 28, agent_host=10)
    subnet = plan.subnet(3)
    assert str(subnet) == "100.64.0.48/28"
    assert str(plan.agent_address(subnet)) == "100.64.0.58"
    v6 = AddressPlan("fd00:6b6d::/48", 64)
    assert str(v6.agent_address(v6.subnet(1))) == "fd00:6b6d:0:1::64"
    assert isinstance(v6.subnet(1), ipaddress.IPv6Network)


@pytest.mark.parametrize(
    ("pool", "prefix", "host"),
    [
        ("100.64.0.0/33", 24, 100),
        ("100.64.0.1/10", 24, 100),
        ("100.64.0.0/24", 16, 100),
        ("100.64.0.0/10", 31, 100),
        ("100.64.0.0/10", 24, 255),
        ("nonsense", 24, 100),
    ],
)
def test_bad_plans_are_rejected(pool: str, prefix: int, host: int) -> None:
    with pytest.raises(ValueError):
        AddressPlan(pool, prefix, host)


def test_index_round_trip() -> None:
    plan = AddressPlan("100.64.0.0/10", 24)
    for index in (0, 1, 255, 16383):
        assert plan.index_of(str(plan.subnet(index))) == index
    assert plan.first_free_index({0, 1, 3}) == 2
    with pytest.raises(PoolExhausted):
        AddressPlan("10.0.0.0/23", 24).first_free_index({0, 1})
