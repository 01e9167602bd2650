"""SPELA, backprop and logistic-regression heads on cached frozen-backbone features."""

from spela_transfer.heads.sklearn import BackpropClassifier, SpelaClassifier

__version__ = "0.1.0"

__all__ = ["BackpropClassifier", "SpelaClassifier", "__version__"]
