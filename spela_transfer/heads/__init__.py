"""Heads trained on cached features: SPELA (one local loss per layer) and a backprop MLP."""

from .config import BackpropConfig, SpelaConfig, resolve_hidden_widths
from .fit import FittedHeads, fit_backprop, fit_spela

__all__ = [
    "BackpropConfig",
    "FittedHeads",
    "SpelaConfig",
    "fit_backprop",
    "fit_spela",
    "resolve_hidden_widths",
]
