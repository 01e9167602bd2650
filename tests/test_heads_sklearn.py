"""scikit-learn estimators over the heads: the estimator checks and the API beyond them."""

from dataclasses import fields

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.utils.estimator_checks import parametrize_with_checks

from spela_transfer.heads.config import BackpropConfig, SpelaConfig
from spela_transfer.heads.sklearn import BackpropClassifier, SpelaClassifier

# Small heads and few epochs keep the checks fast; lr 1e-2 lets them reach the
# accuracy that check_classifiers_train requires on its blobs.
CHECKED_ESTIMATORS = [
    SpelaClassifier(hidden_widths=(32, 16), epochs=10, lr=1e-2, random_state=0),
    BackpropClassifier(hidden_widths=(32,), epochs=10, lr=1e-2, random_state=0),
]


# No check is expected to fail: expected_failed_checks returns an empty mapping for both.
@parametrize_with_checks(CHECKED_ESTIMATORS, expected_failed_checks=lambda estimator: {})
def test_estimator_checks(estimator, check):
    check(estimator)


@pytest.mark.parametrize(
    ("estimator_type", "config_type"),
    [(SpelaClassifier, SpelaConfig), (BackpropClassifier, BackpropConfig)],
)
def test_estimator_parameters_cover_config(estimator_type, config_type):
    params = estimator_type().get_params()

    assert set(params) - {"exit_layer", "random_state", "device"} == {
        field.name for field in fields(config_type)
    }
    defaults = config_type()
    for field in fields(config_type):
        assert params[field.name] == getattr(defaults, field.name), field.name


def _blobs(num_samples=90, seed=0):
    generator = np.random.default_rng(seed)
    centres = generator.normal(scale=3.0, size=(3, 6))
    labels = np.arange(num_samples) % 3
    return centres[labels] + generator.normal(size=(num_samples, 6)), labels


@pytest.mark.parametrize("estimator", CHECKED_ESTIMATORS)
def test_string_labels_and_tensors(estimator):
    features, labels = _blobs()
    names = np.array(["cat", "dog", "fox"])[labels]

    fitted = clone(estimator).fit(torch.from_numpy(features), names)

    assert list(fitted.classes_) == ["cat", "dog", "fox"]
    assert fitted.n_features_in_ == 6
    assert fitted.score(torch.from_numpy(features), names) > 0.9
    assert set(fitted.predict(features)) <= {"cat", "dog", "fox"}


def test_same_random_state_same_predictions():
    features, labels = _blobs()
    estimator = SpelaClassifier(hidden_widths=(16, 8), epochs=3, random_state=4)

    first = clone(estimator).fit(features, labels)
    again = clone(estimator).fit(features, labels)
    other = clone(estimator).set_params(random_state=5).fit(features, labels)

    assert np.array_equal(first.decision_function(features), again.decision_function(features))
    assert torch.equal(first.heads_.weights[0], again.heads_.weights[0])
    assert not torch.equal(first.heads_.weights[0], other.heads_.weights[0])


def test_random_state_none_draws_seed():
    features, labels = _blobs()

    first = SpelaClassifier(hidden_widths=(8, 4), epochs=1).fit(features, labels)
    second = SpelaClassifier(hidden_widths=(8, 4), epochs=1).fit(features, labels)

    assert first.seed_ != second.seed_


def test_exit_layer_selects_scores():
    features, labels = _blobs()
    estimator = SpelaClassifier(hidden_widths=(32, 16), epochs=5, lr=1e-2, random_state=0).fit(
        features, labels
    )
    scores = estimator.heads_.exit_scores(torch.from_numpy(features).float(), dtype=torch.float64)

    by_index = estimator.set_params(exit_layer=0).decision_function(features)
    by_name = estimator.set_params(exit_layer="layer1").decision_function(features)
    last = estimator.set_params(exit_layer=-1).decision_function(features)
    output = estimator.set_params(exit_layer="output").decision_function(features)

    np.testing.assert_array_equal(by_index, scores[0, 0].numpy())
    np.testing.assert_array_equal(by_name, by_index)
    np.testing.assert_array_equal(last, scores[0, 1].numpy())
    np.testing.assert_array_equal(output, last)


def test_binary_decision_function_is_difference():
    features, labels = _blobs()
    keep = labels < 2
    estimator = SpelaClassifier(hidden_widths=(16, 8), epochs=3, random_state=0).fit(
        features[keep], labels[keep]
    )
    scores = estimator.heads_.exit_scores(
        torch.from_numpy(features[keep]).float(), dtype=torch.float64
    )[0, -1].numpy()

    np.testing.assert_allclose(
        estimator.decision_function(features[keep]), scores[:, 1] - scores[:, 0]
    )


def test_backprop_predict_proba_is_softmax():
    features, labels = _blobs()
    estimator = BackpropClassifier(hidden_widths=(16,), epochs=3, random_state=0).fit(
        features, labels
    )

    probabilities = estimator.predict_proba(features)

    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)
    np.testing.assert_array_equal(
        estimator.classes_[probabilities.argmax(axis=1)], estimator.predict(features)
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("estimator", CHECKED_ESTIMATORS)
def test_cuda_device(estimator):
    features, labels = _blobs()

    fitted = clone(estimator).set_params(device="cuda").fit(features, labels)

    assert fitted.heads_.device.type == "cuda"
    assert fitted.score(features, labels) > 0.9
