"""Frozen prior sources: VAE encoders whose intermediate levels are alignment targets."""

from ahpa.priors.base import EncoderOutput, Level, PriorEncoder
from ahpa.priors.registry import load_encoder, register_encoder

__all__ = ["EncoderOutput", "Level", "PriorEncoder", "load_encoder", "register_encoder"]
