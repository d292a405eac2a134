"""The driver's faults and accounting on real Ray actors, the tiny model and real games.

- the replay buffer actor killed (Ray restarts it, empty): the rollout actors and the driver carry on, its death is not
  taken for a rollout actor's, and the groups it held are counted lost once.
"""

from __future__ import annotations

import time

import pytest
from test_train import SMALL

from launch import cluster
from launch.rollouts import RolloutDriver
from launch.train import load_config

# The smallest batch that still has two actors' worth of rounds: 2 groups of 2 short responses.
TINY = [*SMALL, "trainer.groups_per_step=2", "actors.states_per_round=2", "actors.group_size=2"]


@pytest.fixture
def fleet(ray_local, tiny_model_dir):
    """A restartable buffer and one rollout actor placed as a training run places them; removed afterwards."""
    from ray.util import get_placement_group, remove_placement_group

    config, _ = load_config([*TINY, "actors.max_new_tokens=8"])
    buffer = cluster.start_buffer(config)
    actors = cluster.start_rollouts(config, str(tiny_model_dir), buffer, gpu=False)
    yield config, buffer, actors
    for actor in [buffer, *actors.actors]:
        ray_local.kill(actor)
    remove_placement_group(get_placement_group("rollouts"))


def test_a_killed_buffer_restarts_empty_and_only_its_groups_are_lost(ray_local, fleet):
    config, buffer, actors = fleet
    driver = RolloutDriver(config, actors, buffer, learners=None)
    items, _ = driver.collect()  # a sync batch: one round of 2 groups
    assert len(items) == 2
    ray_local.get(actors.actors[0].run_round.remote(2))  # 2 more groups wait in the buffer
    assert driver.buffer_stats().size == 2
    incarnation = ray_local.get(actors.actors[0].get_incarnation.remote())

    ray_local.kill(buffer, no_restart=False)
    # A round whose puts meet the restarting buffer: Ray sends them to the new one; the actor does not die.
    round_ref = actors.actors[0].run_round.remote(2)
    time.sleep(0.5)
    result = ray_local.get(round_ref)
    assert result.stats.num_accepted == 2
    assert ray_local.get(actors.actors[0].get_incarnation.remote()) == incarnation

    items, metrics = driver.collect()  # the driver carries on with the new buffer (holding that round's 2 groups)
    assert len(items) == 2
    assert driver.counters() == {
        "faults/actor_restarts": 0.0,
        "faults/learner_restarts": 0.0,
        "faults/buffer_restarts": 1.0,
        "faults/lost_groups": 2.0,  # what the old buffer held, counted once
    }
    driver.buffer_stats()
    assert driver.counters()["faults/lost_groups"] == 2.0
