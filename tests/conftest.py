"""Two fake CPU devices for every test, so that data-parallel code paths run in the suite; tests that need
one device build a one-device mesh."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A persistent compilation cache shared by the tests and the runs they start in subprocesses: most of a debug
# run's time on a CPU is compilation, and many tests compile the same programs.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.dirname(__file__)), ".pytest_cache", "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The debug models' programs are small and mostly run a few times each, so LLVM's optimisation costs the suite more
# CPU than it saves (tests/test_phases.py: 133 s of CPU instead of 195 s). Put first, so that flags of the user's
# own XLA_FLAGS, which come later, win.
os.environ["XLA_FLAGS"] = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                           + os.environ.get("XLA_FLAGS", "")).strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 2)

import pytest  # noqa: E402

from configs import atari100k  # noqa: E402
from diamond_jax.agent import Agent  # noqa: E402


def stopping_after(trainer_class):
    """trainer_class (a run's or a seed group's trainer) made to ask itself to stop at its n-th opportunity to
    save (`stop_after=n`), as a SIGTERM arriving then would."""

    class StopsAfter(trainer_class):
        def __init__(self, *args, stop_after: int, **kwargs):
            self._opportunities = stop_after
            super().__init__(*args, **kwargs)

        def _maybe_stop_or_save(self):
            self._opportunities -= 1
            if self._opportunities == 0:
                self.request_stop()
            return super()._maybe_stop_or_save()

    return StopsAfter


def with_fields(config, **fields):
    """The config with the given fields set, locked again: with_fields(c, **{"denoiser.optimizer.lr": 1e-3})."""
    config = config.unlock()
    for field, value in fields.items():
        *parents, leaf = field.split(".")
        section = config
        for p in parents:
            section = section[p]
        section[leaf] = value
    return config.lock()


@pytest.fixture(scope="session")
def debug_config():
    return atari100k.get_config("debug")


@pytest.fixture(scope="session")
def debug_agent(debug_config):
    """A debug-size agent for a 4-action game and its freshly initialised variables."""
    agent = Agent.from_config(debug_config, num_actions=4)
    return agent, agent.init(jax.random.key(0))
