"""Every input check of the heads raises a message that names the value and the fix."""

import numpy as np
import pytest
import torch

from spela_transfer.heads import BackpropConfig, SpelaConfig, fit_backprop, fit_spela
from spela_transfer.heads.sklearn import BackpropClassifier, SpelaClassifier

FEATURES = torch.randn(12, 5, generator=torch.Generator().manual_seed(0))
LABELS = torch.arange(12) % 3
TINY = SpelaConfig(hidden_widths=(8, 4), epochs=1)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"hidden_widths": ()}, r"hidden_widths must be a non-empty tuple .* got \(\)"),
        ({"hidden_widths": [8, 4]}, r"hidden_widths must be a non-empty tuple .* got \[8, 4\]"),
        ({"hidden_widths": (8, 0)}, "each of hidden_widths must be a positive integer, got 0"),
        ({"epochs": 0}, "epochs must be a positive integer, got 0"),
        ({"epochs": 2.0}, "epochs must be a positive integer, got 2.0"),
        ({"batch_size": -1}, "batch_size must be a positive integer, got -1"),
        ({"optimizer": "adamw"}, "optimizer must be one of 'adam', 'sgd'; got 'adamw'"),
        ({"lr": 0.0}, "lr must be a positive number, got 0.0"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\), got 1.0"),
        ({"lr_step_epochs": 0}, "lr_step_epochs must be a positive integer, got 0"),
        ({"lr_gamma": -0.5}, "lr_gamma must be a positive number, got -0.5"),
        (
            {"activation": "swish"},
            "activation must be one of 'leaky_relu', 'relu', .*; got 'swish'",
        ),
        ({"negative_slope": 1.5}, r"negative_slope must be in \[0, 1\), got 1.5"),
        ({"loss": "mse"}, "loss must be one of 'neg_cos', 'log2cos', 'euclidean'; got 'mse'"),
        (
            {"class_vectors": "simplex"},
            "class_vectors must be one of 'symmetric', 'gaussian'; got 'simplex'",
        ),
        (
            {"loop_order": "layer_wise"},
            "loop_order must be one of 'per_batch', 'layerwise'; got 'layer_wise'",
        ),
        ({"update": "manual"}, "update must be one of 'closed_form', 'autograd'; got 'manual'"),
        ({"coulomb_steps": 0}, "coulomb_steps must be a positive integer, got 0"),
        ({"normalize_input": "maybe"}, "normalize_input must be true or false, got 'maybe'"),
        ({"binarize_weights": 1}, "binarize_weights must be true or false, got 1"),
        ({"shuffle": "no"}, "shuffle must be true or false, got 'no'"),
    ],
)
def test_spela_config_rejects(settings, message):
    with pytest.raises(ValueError, match=message):
        SpelaConfig(**settings)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"hidden_widths": (0,)}, "each of hidden_widths must be a positive integer, got 0"),
        ({"epochs": -3}, "epochs must be a positive integer, got -3"),
        ({"optimizer": "rmsprop"}, "optimizer must be one of 'adam', 'sgd'; got 'rmsprop'"),
        ({"lr": -1.0}, "lr must be a positive number, got -1.0"),
        ({"momentum": -0.1}, r"momentum must be in \[0, 1\), got -0.1"),
        ({"lr_step_epochs": -2}, "lr_step_epochs must be a positive integer, got -2"),
        ({"activation": "elu"}, "activation must be one of .*; got 'elu'"),
        ({"negative_slope": -0.1}, r"negative_slope must be in \[0, 1\), got -0.1"),
        ({"shuffle": "yes"}, "shuffle must be true or false, got 'yes'"),
    ],
)
def test_backprop_config_rejects(settings, message):
    with pytest.raises(ValueError, match=message):
        BackpropConfig(**settings)


@pytest.mark.parametrize("fit", [fit_spela, fit_backprop])
@pytest.mark.parametrize(
    ("features", "labels", "num_classes", "error", "message"),
    [
        (FEATURES.numpy(), LABELS, 3, TypeError, "must be torch tensors, got ndarray and Tensor"),
        (
            FEATURES[0],
            LABELS,
            3,
            ValueError,
            r"features must be a 2-D tensor \[N, D\], got shape \(5,\)",
        ),
        (FEATURES[:0], LABELS[:0], 3, ValueError, r"features are empty \(0 samples\)"),
        (FEATURES[:, :0], LABELS, 3, ValueError, "features have 0 columns"),
        (
            FEATURES.long(),
            LABELS,
            3,
            ValueError,
            "features must be a floating-point tensor, got dtype torch.int64",
        ),
        (
            FEATURES,
            LABELS[:5],
            3,
            ValueError,
            r"labels must have shape \[N\] = \(12,\) .* got \(5,\)",
        ),
        (
            FEATURES,
            LABELS.float(),
            3,
            ValueError,
            "labels must be an integer tensor, got dtype torch.float32",
        ),
        (FEATURES, LABELS, 1, ValueError, "num_classes must be an integer >= 2, got 1"),
        (
            FEATURES,
            LABELS,
            2,
            ValueError,
            r"labels must lie in 0..1 for num_classes=2, got values from 0 to 2",
        ),
        (FEATURES, torch.zeros(12, dtype=torch.int64), 3, ValueError, r"only one class \(0\)"),
    ],
)
def test_fit_rejects_inputs(fit, features, labels, num_classes, error, message):
    with pytest.raises(error, match=message):
        fit(features, labels, num_classes, seeds=[0])


@pytest.mark.parametrize("fit", [fit_spela, fit_backprop])
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_fit_rejects_non_finite(fit, bad_value):
    features = FEATURES.clone()
    features[4, 2] = bad_value

    with pytest.raises(ValueError, match=r"features contain NaN or inf in 1 rows \(first row 4\)"):
        fit(features, LABELS, 3, seeds=[0])


@pytest.mark.parametrize(
    ("seeds", "message"),
    [
        (3, "seeds must be a non-empty sequence of integers such as .* got 3"),
        ([], r"seeds must be a non-empty sequence .* got \[\]"),
        ([0, -1], r"each seed must be a non-negative integer, got -1 in \[0, -1\]"),
        ([0.5], r"each seed must be a non-negative integer, got 0.5"),
        ([0, 2, 0], r"seeds must not repeat a value, got \[0, 2, 0\]; list each once"),
    ],
)
def test_fit_rejects_seeds(seeds, message):
    with pytest.raises(ValueError, match=message):
        fit_spela(FEATURES, LABELS, 3, TINY, seeds=seeds)


def test_fit_rejects_unknown_device():
    with pytest.raises(
        ValueError, match="device must name a torch device such as 'cpu' or 'cuda', got 'gpu0'"
    ):
        fit_spela(FEATURES, LABELS, 3, TINY, seeds=[0], device="gpu0")


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message shown where CUDA is absent"
)
def test_fit_rejects_missing_cuda():
    with pytest.raises(ValueError, match="device 'cuda' requested but CUDA is not available here"):
        fit_backprop(FEATURES, LABELS, 3, seeds=[0], device="cuda")


def test_fit_rejects_classes_beyond_class_vectors():
    labels = torch.arange(12) % 3
    config = SpelaConfig(hidden_widths=(8, 1), epochs=1)

    with pytest.raises(
        ValueError, match="width 1 can hold at most 2 .* num_classes=3; widen the layers"
    ):
        fit_spela(FEATURES, labels, 3, config, seeds=[0])


@pytest.mark.parametrize("fit", [fit_spela, fit_backprop])
def test_exit_scores_rejects_width(fit):
    fitted = fit(FEATURES, LABELS, 3, seeds=[0])

    with pytest.raises(
        ValueError, match=r"shape \[N, 5\] like the training features, got \(12, 4\)"
    ):
        fitted.exit_scores(FEATURES[:, :4])


def test_exit_scores_rejects_non_finite():
    fitted = fit_spela(FEATURES, LABELS, 3, TINY, seeds=[0])
    features = FEATURES.clone()
    features[0, 0] = float("nan")

    with pytest.raises(ValueError, match="features contain NaN or inf; drop or impute"):
        fitted.exit_scores(features)


@pytest.mark.parametrize("estimator", [SpelaClassifier(epochs=1), BackpropClassifier(epochs=1)])
def test_classifier_rejects_one_class(estimator):
    with pytest.raises(ValueError, match=r"y contains only one class \('a'\)"):
        estimator.fit(FEATURES.numpy(), np.array(["a"] * 12))


def test_classifier_rejects_negative_random_state():
    with pytest.raises(ValueError, match="random_state must be a non-negative integer, got -5"):
        SpelaClassifier(epochs=1, random_state=-5).fit(FEATURES, LABELS)


@pytest.mark.parametrize("exit_layer", ["layer3", 2, -3, 1.0])
def test_spela_classifier_rejects_exit_layer(exit_layer):
    estimator = SpelaClassifier(
        hidden_widths=(8, 4), epochs=1, random_state=0, exit_layer=exit_layer
    )

    with pytest.raises(ValueError, match="exit_layer must be"):
        estimator.fit(FEATURES, LABELS)


def test_backprop_classifier_rejects_exit_layer():
    estimator = BackpropClassifier(
        hidden_widths=(8,), epochs=1, random_state=0, exit_layer="layer1"
    )

    with pytest.raises(ValueError, match="exit_layer must be 'output' or an index, got 'layer1'"):
        estimator.fit(FEATURES, LABELS)


def test_backprop_classifier_rejects_exit_index():
    estimator = BackpropClassifier(hidden_widths=(8,), epochs=1, random_state=0, exit_layer=1)

    with pytest.raises(
        ValueError, match=r"exit_layer must be an index in -1\.\.0 or 'output', got 1"
    ):
        estimator.fit(FEATURES, LABELS)


def test_spela_classifier_exit_error_lists_layers():
    estimator = SpelaClassifier(hidden_widths=(8, 4), epochs=1, random_state=0, exit_layer=2)

    with pytest.raises(
        ValueError,
        match=(
            r"exit_layer must be an index in -2\.\.1 or one of 'layer1', 'layer2', 'output', "
            r"got 2"
        ),
    ):
        estimator.fit(FEATURES, LABELS)


def test_classifier_rejects_width_at_predict():
    estimator = SpelaClassifier(hidden_widths=(8, 4), epochs=1, random_state=0).fit(
        FEATURES, LABELS
    )

    with pytest.raises(
        ValueError, match="X has 4 features, but SpelaClassifier is expecting 5 features"
    ):
        estimator.predict(FEATURES[:, :4])


def test_classifier_rejects_nan():
    features = FEATURES.numpy().copy()
    features[3, 1] = np.nan

    with pytest.raises(ValueError, match="Input X contains NaN"):
        SpelaClassifier(epochs=1).fit(features, LABELS.numpy())


def test_classifier_rejects_empty_input():
    with pytest.raises(ValueError, match=r"Found array with 0 sample\(s\)"):
        BackpropClassifier(epochs=1).fit(np.zeros((0, 5)), np.zeros(0))
