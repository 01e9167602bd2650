"""SPELA, backprop and logistic-regression heads on cached frozen-backbone features."""

from spela_transfer.heads.sklearn import BackpropClassifier, SpelaClassifier

__version__ = "0.1.0"

# Log lines of the command-line tool and of the processes that `fit` starts.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

__all__ = ["BackpropClassifier", "SpelaClassifier", "__version__"]
