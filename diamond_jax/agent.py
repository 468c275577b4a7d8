"""The agent: the three models of DIAMOND built from one config, and their variables as one pytree.

With `denoiser.space = "latent"` the denoiser draws the latents of a frozen autoencoder (models/autoencoder.py)
instead of frames; the reward/end model and the actor-critic still see frames, decoded from the drawn latents.
The autoencoder's variables then travel with the agent's under "autoencoder" (never trained here).
"""

import dataclasses
from typing import Any, Dict, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp

from diamond_jax.models.actor_critic import ActorCritic
from diamond_jax.models.autoencoder import Autoencoder
from diamond_jax.models.denoiser import Denoiser
from diamond_jax.models.rew_end import RewEndModel
from diamond_jax.models.sampler import SamplerConfig

MODEL_NAMES = ("denoiser", "rew_end_model", "actor_critic")  # the trained models
AUTOENCODER = "autoencoder"  # a latent agent's frozen autoencoder, beside the trained models' variables
AgentVariables = Dict[str, Dict[str, Any]]  # model name -> {"params": ..., "buffers": ...}


class LatentSpace(NamedTuple):
    """What a latent agent's denoiser needs beyond the config: the autoencoder whose latents it draws, and EDM's
    sigma_data in latent units."""

    autoencoder: Autoencoder
    sigma_data: float

    def to_json(self) -> Dict[str, Any]:
        return {"autoencoder": self.autoencoder.to_json(), "sigma_data": self.sigma_data}

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "LatentSpace":
        return cls(Autoencoder.from_json(d["autoencoder"]), float(d["sigma_data"]))


@dataclasses.dataclass(frozen=True)
class Agent:
    denoiser: Denoiser
    rew_end_model: RewEndModel
    actor_critic: ActorCritic
    sampler: SamplerConfig
    size: int  # frames are size x size RGB
    autoencoder: Optional[Autoencoder] = None  # denoiser.space "latent": the denoiser draws its latents

    @classmethod
    def from_config(cls, config, num_actions: int, latent: Optional[LatentSpace] = None) -> "Agent":
        """A latent agent (config.denoiser.space "latent") needs its latent space (training/latent_agent.py
        measures sigma_data on the encoded replay); a pixel agent takes none."""
        denoiser = Denoiser.from_config(config, num_actions)
        autoencoder = None
        if config.denoiser.get("space", "pixel") == "latent":
            if latent is None:
                raise ValueError("a latent agent (denoiser.space 'latent') needs its autoencoder and its sigma_data")
            autoencoder = latent.autoencoder
            autoencoder.check_size((config.env.size, config.env.size))
            denoiser = dataclasses.replace(denoiser, img_channels=autoencoder.latent_channels, quantize=False,
                                           sigma_data=float(latent.sigma_data))
        elif latent is not None:
            raise ValueError("a latent space goes with denoiser.space 'latent' only")
        return cls(
            denoiser=denoiser,
            rew_end_model=RewEndModel.from_config(config, num_actions),
            actor_critic=ActorCritic.from_config(config, num_actions),
            sampler=SamplerConfig.from_config(config),
            size=config.env.size,
            autoencoder=autoencoder,
        )

    @property
    def num_actions(self) -> int:
        return self.actor_critic.num_actions

    @property
    def is_latent(self) -> bool:
        return self.autoencoder is not None

    @property
    def latent(self) -> Optional[LatentSpace]:
        return LatentSpace(self.autoencoder, self.denoiser.sigma_data) if self.is_latent else None

    @property
    def denoised_size(self) -> int:
        """The side of what the denoiser draws: the frame's, or its latent's."""
        return self.size // self.autoencoder.downsampling if self.is_latent else self.size

    def init(self, key: jax.Array) -> AgentVariables:
        """Fresh variables of the trained models, and a latent agent's autoencoder initialised at random (its
        shapes; a run puts the pretrained one in its place)."""
        keys = dict(zip(MODEL_NAMES + (AUTOENCODER,), jax.random.split(key, len(MODEL_NAMES) + 1)))
        sizes = {"denoiser": self.denoised_size}
        variables = {name: {"buffers": {}, **getattr(self, name).init(keys[name], sizes.get(name, self.size))}
                     for name in MODEL_NAMES}
        if self.is_latent:
            variables[AUTOENCODER] = dict(self.autoencoder.init(keys[AUTOENCODER], (self.size, self.size)))
        return variables

    def encode(self, variables: AgentVariables, obs: jax.Array) -> jax.Array:
        """What the denoiser sees of frames obs [..., size, size, 3] in [-1, 1]: the frames themselves, or their
        latents; padding frames (all 0: no uint8 frame maps to 0 exactly) stay 0 in latent space too."""
        if not self.is_latent:
            return obs
        chex.assert_shape(obs, (..., self.size, self.size, 3))
        z = self.autoencoder.encode(variables[AUTOENCODER], obs)
        padding = jnp.all(obs == 0, axis=(-3, -2, -1))
        return jnp.where(padding[..., None, None, None], 0.0, z)

    def decode(self, variables: AgentVariables, drawn: jax.Array) -> jax.Array:
        """The frames [..., size, size, 3] of what the denoiser drew: itself, or its latents decoded onto the 256
        levels of a uint8 frame, as the pixel denoiser's frames are."""
        if not self.is_latent:
            return drawn
        return self.autoencoder.decode_frames(variables[AUTOENCODER], drawn)
