"""The broker's state (broker/state.py), as pure logic: placement, limits, release, an instance's life."""

import pytest

from arservice.broker.state import Agent, Instance, Pool, State
from arservice.protocol import ServiceError


def config(type_="local", cpus=None, memory=None):
    return {"type": type_, "cpus": cpus, "memory": memory}


def add_agent(pool, name, now=0.0, types=("local",), **capacity):
    agent = Agent(name.encode(), name, {"instances": None, "cpus": None, "memory": None, **capacity},
                  list(types), "host", 1, None, now)
    pool.agents[agent.identity] = agent
    return agent


def start(pool, name, cfg):
    inst = Instance(name, "", {}, cfg)
    agent = pool.place(cfg["type"], inst.cost)
    pool.check_limits(inst.cost)
    inst.agent_id = agent.agent_id
    pool.admit(inst, agent)
    return inst, agent


def no_capacity(call, *args):
    with pytest.raises(ServiceError) as err:
        call(*args)
    assert err.value.code == "no_capacity"
    return err.value.message


def test_placement_fills_the_least_loaded_agent_first_and_the_older_on_a_tie():
    pool = Pool({})
    add_agent(pool, "a", now=1.0, instances=4)
    add_agent(pool, "b", now=2.0, instances=2)
    placed = [start(pool, f"i{n}", config())[1].agent_id for n in range(6)]
    # a and b tie at 0 (a is older), then b is at 1/2 against a's 1/4, and so on by share of capacity.
    assert placed == ["a", "b", "a", "a", "b", "a"]
    assert "out of instances" in no_capacity(pool.place, "local", Instance("i9", "", {}, config()).cost)


def test_draining_unreachable_and_other_types_are_never_chosen():
    pool = Pool({})
    add_agent(pool, "draining").draining = True
    add_agent(pool, "silent").unreachable_since = 5.0
    add_agent(pool, "docker-only", types=("docker",))
    assert "no registered agent runs 'local'" in no_capacity(pool.place, "local", Instance("i", "", {}, config()).cost)
    add_agent(pool, "ok")
    assert start(pool, "i1", config())[1].agent_id == "ok"


def test_service_limits_name_the_resource_and_fractional_cpus_add_up_exactly():
    pool = Pool({"cpus": 1, "instances": 10})
    add_agent(pool, "a")
    instances = [start(pool, f"i{n}", config(cpus=c))[0] for n, c in enumerate((0.1, 0.2, 0.3, 0.4))]
    message = no_capacity(pool.check_limits, Instance("x", "", {}, config(cpus=0.1)).cost)
    assert message == "service limit reached: cpus (1 of 1 in use)"
    for inst in instances:
        pool.release(inst)
    assert pool.used == {"instances": 0, "cpus": 0, "memory": 0}  # not 2.8e-17
    assert pool.describe(0.0)["used"]["cpus"] == 0


def test_a_dropped_agent_loses_its_instances_and_frees_what_they_held():
    pool = Pool({})
    agent = add_agent(pool, "a", memory=4096)
    other = add_agent(pool, "b", memory=4096)
    inst, _ = start(pool, "i1", config(memory=1024))
    kept, _ = start(pool, "i2", config(memory=1024))
    assert {inst.agent_id, kept.agent_id} == {"a", "b"}
    dead = agent if inst.agent_id == "a" else other
    pool.drop_agent(dead)
    assert inst.state == "lost" and inst.ended_at is not None
    assert pool.used == {"instances": 1, "cpus": 0, "memory": 1024}
    pool.release(inst)  # a lost record stays, so that requests on it say why it is gone
    assert "i1" in pool.instances and pool.used["instances"] == 1


def test_capacity_is_the_agents_sum_capped_by_the_limits():
    pool = Pool({"instances": 5})
    add_agent(pool, "a", instances=3)
    add_agent(pool, "b", instances=4)
    assert pool.capacity()["instances"] == 5
    assert pool.capacity()["cpus"] is None  # an agent that does not count cpus: unlimited
    pool.limits["instances"] = 10
    assert pool.capacity()["instances"] == 7


def test_an_instances_life_moves_as_its_events_say():
    pooled = Instance("p", "a", {}, config(), pooled_for="preset")
    plain = Instance("i", "a", {}, config(), ttl_s=60, idle_s=5)
    assert pooled.state == plain.state == State.STARTING
    pooled.started()
    plain.started()
    assert (pooled.state, plain.state) == (State.POOLED, State.RUNNING)
    pooled.handed_out(ttl_s=None, idle_s=7)
    assert (pooled.state, pooled.pooled_for, pooled.idle_s) == (State.RUNNING, None, 7)
    # A silent agent makes running instances unreachable, and only those; its return undoes it.
    plain.closing()
    plain.agent_silent()
    pooled.agent_silent()
    assert (plain.state, pooled.state) == (State.CLOSING, State.UNREACHABLE)
    pooled.agent_back(now=123.0)
    assert (pooled.state, pooled.last_used) == (State.RUNNING, 123.0)
    # An end is kept: an expired instance whose agent is then lost still says it expired.
    plain.ended(State.EXPIRED, wall=1.0)
    plain.ended(State.LOST, wall=2.0)
    assert (plain.state, plain.ended_at) == (State.EXPIRED, 1.0)
    assert plain.describe()["state"] == "expired" and f"{plain.state}" == "expired"
