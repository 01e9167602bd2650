"""scikit-learn estimators over the SPELA and backprop heads.

Both take numpy arrays or torch tensors, any label values, and train on the CPU
or a CUDA device. They fit one head, seeded by `random_state`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .config import BackpropConfig, SpelaConfig, resolve_hidden_widths
from .fit import FittedHeads, fit_backprop, fit_spela

# Upper bound (exclusive) of seeds drawn when random_state is None or a RandomState.
_SEED_BOUND = 2**31 - 1


def _to_numpy(values):
    """Return tensors as numpy arrays on the CPU; leave anything else to scikit-learn's checks."""
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return values


def _seed_from_random_state(random_state) -> int:
    """Return an int seed: the value itself for an int, else one drawn from the RandomState."""
    if isinstance(random_state, (int, np.integer)) and not isinstance(random_state, bool):
        if random_state < 0:
            raise ValueError(f"random_state must be a non-negative integer, got {random_state!r}")
        return int(random_state)
    return int(check_random_state(random_state).randint(_SEED_BOUND))


class _HeadClassifier(ClassifierMixin, BaseEstimator):
    """Shared fit/predict logic; subclasses name their config type and fit function."""

    _config_type: type[SpelaConfig] | type[BackpropConfig]
    _fit_function: Callable[..., FittedHeads]

    def fit(self, X, y):
        """Fit one head on features X [n_samples, n_features] and labels y [n_samples].

        Returns:
            self.

        Raises:
            ValueError: Invalid X or y (NaN or inf, empty, one class only) or settings.
        """
        X, y = validate_data(self, _to_numpy(X), _to_numpy(y), dtype=[np.float32, np.float64])
        check_classification_targets(y)
        self.classes_, encoded = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(
                f"y contains only one class ({self.classes_.tolist()[0]!r}); a classifier needs "
                "samples of at least two classes"
            )

        self.seed_ = _seed_from_random_state(self.random_state)
        self.heads_ = self._fit_heads(
            torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)),
            torch.from_numpy(encoded.astype(np.int64)),
            len(self.classes_),
        )
        self._exit_index()
        return self

    def _fit_heads(
        self, features: torch.Tensor, labels: torch.Tensor, num_classes: int
    ) -> FittedHeads:
        # Every estimator parameter that is also a config field passes straight through.
        params = self.get_params()
        settings = {f.name: params[f.name] for f in fields(self._config_type) if f.name in params}
        widths = None if self.hidden_widths is None else tuple(self.hidden_widths)
        settings["hidden_widths"] = resolve_hidden_widths(widths, num_classes)
        config = self._config_type(**settings)
        return self._fit_function(
            features, labels, num_classes, config, seeds=[self.seed_], device=self.device
        )

    def _exit_index(self) -> int:
        # Both classifiers accept `output` for the last layer, so code can switch between them.
        exits = self.heads_.exit_layers
        names = list(dict.fromkeys([*exits, "output"]))
        listed = ", ".join(map(repr, names))
        listed = f"one of {listed}" if len(names) > 1 else listed
        if isinstance(self.exit_layer, str):
            if self.exit_layer not in names:
                raise ValueError(
                    f"exit_layer must be {listed} or an index, got {self.exit_layer!r}"
                )
            if self.exit_layer == "output":
                return len(exits) - 1
            return exits.index(self.exit_layer)
        valid = isinstance(self.exit_layer, (int, np.integer)) and not isinstance(
            self.exit_layer, bool
        )
        if not valid or not -len(exits) <= self.exit_layer < len(exits):
            raise ValueError(
                f"exit_layer must be an index in {-len(exits)}..{len(exits) - 1} or {listed}, "
                f"got {self.exit_layer!r}"
            )
        return int(self.exit_layer) % len(exits)

    def _scores(self, X) -> np.ndarray:
        """Return the scores [n_samples, n_classes] of the chosen exit layer."""
        check_is_fitted(self)
        X = validate_data(self, _to_numpy(X), reset=False, dtype=[np.float32, np.float64])
        # float64 inference keeps each row's scores independent of the batch it arrives in.
        features = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
        scores = self.heads_.exit_scores(features, dtype=torch.float64)
        return scores[0, self._exit_index()].numpy()

    def decision_function(self, X) -> np.ndarray:
        """Return the exit layer's scores: [n_samples, n_classes], or [n_samples] for two classes.

        With two classes the score is that of the second class minus that of the first,
        so a positive value predicts `classes_[1]`.
        """
        scores = self._scores(X)
        if len(self.classes_) == 2:
            return scores[:, 1] - scores[:, 0]
        return scores

    def predict(self, X) -> np.ndarray:
        """Return the class with the highest score at the exit layer, [n_samples]."""
        scores = self._scores(X)
        return self.classes_[scores.argmax(axis=1)]


class SpelaClassifier(_HeadClassifier):
    """SPELA head: each layer learns to align its output with fixed class vectors.

    Scores are cosines to the class vectors of the layer named by `exit_layer`, in
    [-1, 1]. They are not probabilities, so there is no `predict_proba`. Parameters
    mirror SpelaConfig, whose docstring explains them; `hidden_widths` may be any
    sequence of ints.

    Args:
        exit_layer: Index of the layer that predicts (-1 is the last) or its name
            (`layer1`, `layer2`, ..., or `output` for the last). It can be changed
            after fitting.
        random_state: Seed of class vectors, init and batch order: an int, None or a
            numpy RandomState.
        device: Torch device to train and predict on, such as `cpu` or `cuda`.
    """

    _config_type = SpelaConfig
    _fit_function = staticmethod(fit_spela)

    def __init__(
        self,
        hidden_widths=None,
        epochs: int = 50,
        batch_size: int = 32,
        optimizer: str = "adam",
        lr: float = 1e-3,
        momentum: float = 0.0,
        lr_step_epochs: int | None = None,
        lr_gamma: float = 0.1,
        activation: str = "leaky_relu",
        negative_slope: float = 0.001,
        loss: str = "log2cos",
        normalize_input: bool = False,
        class_vectors: str = "symmetric",
        loop_order: str = "per_batch",
        binarize_weights: bool = False,
        update: str = "closed_form",
        shuffle: bool = True,
        coulomb_steps: int = 500,
        exit_layer: int | str = -1,
        random_state=None,
        device: str = "cpu",
    ):
        self.hidden_widths = hidden_widths
        self.epochs = epochs
        self.batch_size = batch_size
        self.optimizer = optimizer
        self.lr = lr
        self.momentum = momentum
        self.lr_step_epochs = lr_step_epochs
        self.lr_gamma = lr_gamma
        self.activation = activation
        self.negative_slope = negative_slope
        self.loss = loss
        self.normalize_input = normalize_input
        self.class_vectors = class_vectors
        self.loop_order = loop_order
        self.binarize_weights = binarize_weights
        self.update = update
        self.shuffle = shuffle
        self.coulomb_steps = coulomb_steps
        self.exit_layer = exit_layer
        self.random_state = random_state
        self.device = device


class BackpropClassifier(_HeadClassifier):
    """Backprop MLP head: hidden layers like SPELA's plus a linear layer to logits.

    Parameters mirror BackpropConfig. Scores are the logits; `predict_proba` is
    their softmax.

    Args:
        exit_layer: The only exit, `output` (or index 0 or -1); kept for an API
            shared with SpelaClassifier.
        random_state: Seed of init and batch order: an int, None or a numpy RandomState.
        device: Torch device to train and predict on, such as `cpu` or `cuda`.
    """

    _config_type = BackpropConfig
    _fit_function = staticmethod(fit_backprop)

    def __init__(
        self,
        hidden_widths=None,
        epochs: int = 50,
        batch_size: int = 32,
        optimizer: str = "adam",
        lr: float = 1e-3,
        momentum: float = 0.0,
        lr_step_epochs: int | None = None,
        lr_gamma: float = 0.1,
        activation: str = "leaky_relu",
        negative_slope: float = 0.001,
        shuffle: bool = True,
        exit_layer: int | str = -1,
        random_state=None,
        device: str = "cpu",
    ):
        self.hidden_widths = hidden_widths
        self.epochs = epochs
        self.batch_size = batch_size
        self.optimizer = optimizer
        self.lr = lr
        self.momentum = momentum
        self.lr_step_epochs = lr_step_epochs
        self.lr_gamma = lr_gamma
        self.activation = activation
        self.negative_slope = negative_slope
        self.shuffle = shuffle
        self.exit_layer = exit_layer
        self.random_state = random_state
        self.device = device

    def predict_proba(self, X) -> np.ndarray:
        """Return class probabilities [n_samples, n_classes], the softmax of the logits."""
        logits = torch.from_numpy(self._scores(X)).double()
        return torch.softmax(logits, dim=1).numpy()
