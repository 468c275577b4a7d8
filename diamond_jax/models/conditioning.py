"""The denoiser's conditioning choices (models/denoiser.py, the paper's section 4.2). Plain Python at import:
config validation imports them before JAX may be imported."""

CONDITIONINGS = ("frame_stack", "cross_attention")  # denoiser.conditioning: how the past frames enter
CONDITION_DROPOUT_TARGETS = ("all", "actions")  # denoiser.condition_dropout_target: what a null row loses
