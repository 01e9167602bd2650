"""Frozen configurations of the SPELA and backprop heads.

The defaults are the transfer-learning settings of the SPELA paper (Somasundaram,
Mishra, Borthakur, arXiv 2402.09769): hidden widths chosen from the class count,
50 epochs, batch 32, Adam with learning rate 1e-3, LeakyReLU(0.001) on every layer
and Kaiming-normal weights.
"""

from __future__ import annotations

from dataclasses import dataclass

ACTIVATIONS = ("leaky_relu", "relu", "tanh", "sigmoid", "gelu", "identity")
LOSSES = ("neg_cos", "log2cos", "euclidean")
CLASS_VECTOR_METHODS = ("symmetric", "gaussian")
LOOP_ORDERS = ("per_batch", "layerwise")
OPTIMIZERS = ("adam", "sgd")
UPDATES = ("closed_form", "autograd")

# Above this class count the reference settings switch to the wider head.
WIDE_HEAD_MIN_CLASSES = 51
WIDE_HIDDEN_WIDTHS = (1024, 1024)
NARROW_HIDDEN_WIDTHS = (512, 64)


def resolve_hidden_widths(
    hidden_widths: tuple[int, ...] | None, num_classes: int
) -> tuple[int, ...]:
    """Return the hidden widths to build, applying the class-count rule when none are given.

    More than 50 classes give 1024 → 1024, otherwise 512 → 64.
    """
    if hidden_widths is not None:
        return tuple(hidden_widths)
    if num_classes >= WIDE_HEAD_MIN_CLASSES:
        return WIDE_HIDDEN_WIDTHS
    return NARROW_HIDDEN_WIDTHS


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _check_bool(name: str, value: object) -> None:
    # A YAML value such as `maybe` or `1` would otherwise be taken as true without an error.
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_positive_float(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def _check_hidden_widths(value: object) -> None:
    if value is None:
        return
    if not isinstance(value, tuple) or len(value) == 0:
        raise ValueError(
            f"hidden_widths must be a non-empty tuple of positive integers or None "
            f"(None picks the widths from the class count), got {value!r}"
        )
    for width in value:
        _check_positive_int("each of hidden_widths", width)


def _check_schedule(lr_step_epochs: object, lr_gamma: object) -> None:
    if lr_step_epochs is not None:
        _check_positive_int("lr_step_epochs", lr_step_epochs)
    _check_positive_float("lr_gamma", lr_gamma)


def _check_training_settings(config: SpelaConfig | BackpropConfig) -> None:
    """Validate the settings that both heads share."""
    _check_hidden_widths(config.hidden_widths)
    _check_positive_int("epochs", config.epochs)
    _check_positive_int("batch_size", config.batch_size)
    _check_choice("optimizer", config.optimizer, OPTIMIZERS)
    _check_positive_float("lr", config.lr)
    if isinstance(config.momentum, bool) or not 0 <= config.momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {config.momentum!r}")
    _check_schedule(config.lr_step_epochs, config.lr_gamma)
    _check_choice("activation", config.activation, ACTIVATIONS)
    if not 0 <= config.negative_slope < 1:
        raise ValueError(f"negative_slope must be in [0, 1), got {config.negative_slope!r}")
    _check_bool("shuffle", config.shuffle)


@dataclass(frozen=True)
class SpelaConfig:
    """Settings of a SPELA head: every layer trained on its own local loss.

    The default loss, `log2cos`, and no input normalisation were chosen by
    measurement (`benchmarks/bench_heads.py variants`, recorded in BENCHMARKS.md).
    On efficientnet_lite0 features of 1,000 Fashion-MNIST sample images at 64 and
    224 pixels (test size 0.5, 5 seeds, 50 epochs), all six loss and normalisation
    variants ended within one standard deviation of each other at the output layer.
    `log2cos` without normalisation was the best at 64 pixels (75.3 %) and 0.04
    points below the best at 224 pixels (79.0 %). It is the loss of the SPELA
    authors' published code, their transfer-learning code does not normalise, and
    skipping the normalisation saves one pass over each layer's input.

    Attributes:
        hidden_widths: Output width of each layer; None picks (1024, 1024) for
            more than 50 classes and (512, 64) otherwise. The last layer is an exit
            too, so there is no separate output layer.
        epochs: Passes over the training set (per layer in `layerwise` order).
        batch_size: Samples per update.
        optimizer: `adam` or `sgd`. Each layer steps on its own loss only; the state is
            elementwise, so it is the same as one optimizer per layer.
        lr: Learning rate of every layer's optimizer.
        momentum: SGD momentum; ignored by Adam.
        lr_step_epochs: Multiply the learning rate by `lr_gamma` every this many
            epochs; None keeps it constant.
        lr_gamma: Factor of the step schedule.
        activation: One of `leaky_relu`, `relu`, `tanh`, `sigmoid`, `gelu`, `identity`.
        negative_slope: Slope of `leaky_relu` below zero.
        loss: Local loss on `c = cos(h_k, v_k[label])`: `log2cos` is `log(2 - c)`,
            `neg_cos` is `-c`, `euclidean` is `|h_k / |h_k| - v_k[label]|`.
        normalize_input: L2-normalise each layer's input before its linear map.
        class_vectors: `symmetric` (regular simplex, or Coulomb-energy minimum when
            there are more classes than the width allows) or `gaussian` (ablation).
        loop_order: `per_batch` updates every layer on each batch; `layerwise`
            trains layer 1 for all epochs, then layer 2, and so on.
        binarize_weights: Replace weights by their sign after each epoch (ablation);
            biases stay real.
        update: `closed_form` computes each layer's gradient directly; `autograd`
            lets torch differentiate the same local loss (slower, for checking).
        shuffle: Draw a new batch order every epoch.
        coulomb_steps: Projected-gradient steps of the Coulomb-energy minimisation.
    """

    hidden_widths: tuple[int, ...] | None = None
    epochs: int = 50
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.0
    lr_step_epochs: int | None = None
    lr_gamma: float = 0.1
    activation: str = "leaky_relu"
    negative_slope: float = 0.001
    loss: str = "log2cos"
    normalize_input: bool = False
    class_vectors: str = "symmetric"
    loop_order: str = "per_batch"
    binarize_weights: bool = False
    update: str = "closed_form"
    shuffle: bool = True
    coulomb_steps: int = 500

    def __post_init__(self) -> None:
        _check_training_settings(self)
        _check_choice("loss", self.loss, LOSSES)
        _check_choice("class_vectors", self.class_vectors, CLASS_VECTOR_METHODS)
        _check_choice("loop_order", self.loop_order, LOOP_ORDERS)
        _check_choice("update", self.update, UPDATES)
        _check_positive_int("coulomb_steps", self.coulomb_steps)
        _check_bool("normalize_input", self.normalize_input)
        _check_bool("binarize_weights", self.binarize_weights)


@dataclass(frozen=True)
class BackpropConfig:
    """Settings of the backprop head: the SPELA hidden layers plus a linear layer to logits.

    Trained end to end with softmax cross-entropy.

    Attributes:
        hidden_widths: Hidden layer widths; None applies the same class-count rule as SPELA.
        epochs: Passes over the training set.
        batch_size: Samples per update.
        optimizer: `adam` or `sgd`, one instance for the whole network.
        lr: Learning rate.
        momentum: SGD momentum; ignored by Adam.
        lr_step_epochs: Multiply the learning rate by `lr_gamma` every this many
            epochs; None keeps it constant.
        lr_gamma: Factor of the step schedule.
        activation: Activation of the hidden layers, as in SpelaConfig.
        negative_slope: Slope of `leaky_relu` below zero.
        shuffle: Draw a new batch order every epoch.
    """

    hidden_widths: tuple[int, ...] | None = None
    epochs: int = 50
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.0
    lr_step_epochs: int | None = None
    lr_gamma: float = 0.1
    activation: str = "leaky_relu"
    negative_slope: float = 0.001
    shuffle: bool = True

    def __post_init__(self) -> None:
        _check_training_settings(self)
