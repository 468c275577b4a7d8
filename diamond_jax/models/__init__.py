"""Pure Flax models: the EDM denoiser and its sampler, the reward/end model, the actor-critic."""
