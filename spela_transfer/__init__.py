"""spela-transfer: SPELA, backprop and logistic-regression heads on cached frozen-backbone features."""

__version__ = "0.1.0"
