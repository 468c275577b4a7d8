"""Two fake CPU devices for every test, so that data-parallel code paths run in the suite; tests that need
one device build a one-device mesh."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 2)

import pytest  # noqa: E402

from configs import atari100k  # noqa: E402
from diamond_jax.agent import Agent  # noqa: E402


@pytest.fixture(scope="session")
def debug_config():
    return atari100k.get_config("debug")


@pytest.fixture(scope="session")
def debug_agent(debug_config):
    """A debug-size agent for a 4-action game and its freshly initialised variables."""
    agent = Agent.from_config(debug_config, num_actions=4)
    return agent, agent.init(jax.random.key(0))
