"""The agent: the three models of DIAMOND built from one config, and their variables as one pytree."""

import dataclasses
from typing import Any, Dict

import jax

from diamond_jax.models.actor_critic import ActorCritic
from diamond_jax.models.denoiser import Denoiser
from diamond_jax.models.rew_end import RewEndModel
from diamond_jax.models.sampler import SamplerConfig

MODEL_NAMES = ("denoiser", "rew_end_model", "actor_critic")
AgentVariables = Dict[str, Dict[str, Any]]  # model name -> {"params": ..., "buffers": ...}


@dataclasses.dataclass(frozen=True)
class Agent:
    denoiser: Denoiser
    rew_end_model: RewEndModel
    actor_critic: ActorCritic
    sampler: SamplerConfig
    size: int  # frames are size x size RGB

    @classmethod
    def from_config(cls, config, num_actions: int) -> "Agent":
        return cls(
            denoiser=Denoiser.from_config(config, num_actions),
            rew_end_model=RewEndModel.from_config(config, num_actions),
            actor_critic=ActorCritic.from_config(config, num_actions),
            sampler=SamplerConfig.from_config(config),
            size=config.env.size,
        )

    @property
    def num_actions(self) -> int:
        return self.actor_critic.num_actions

    def init(self, key: jax.Array) -> AgentVariables:
        keys = dict(zip(MODEL_NAMES, jax.random.split(key, len(MODEL_NAMES))))
        return {name: {"buffers": {}, **getattr(self, name).init(keys[name], self.size)} for name in MODEL_NAMES}
