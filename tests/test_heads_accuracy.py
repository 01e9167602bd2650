"""Both heads on real features: the offline backbone on the Fashion-MNIST sample."""

import pytest
import torch
from sklearn.model_selection import train_test_split

from spela_transfer.heads import BackpropConfig, SpelaConfig, fit_backprop, fit_spela


@pytest.fixture(scope="module")
def fashion_split(offline_features):
    """Split the 1,000 features in halves for training and testing, as the reference protocol."""
    features = torch.from_numpy(offline_features.load_features())
    labels = torch.from_numpy(offline_features.labels).long()
    train, test = train_test_split(torch.arange(len(labels)), test_size=0.5, random_state=100)
    return (
        features[train],
        labels[train],
        features[test],
        labels[test],
        offline_features.num_classes,
    )


# NOTE: the fixture's features come from 64-pixel images, where a logistic-regression probe
# (scikit-learn, max_iter=2000, features divided by their std) reaches 75.0 % top-1 on this
# split, so 80 % is out of reach; the heads must come within 3 points of that probe.
@pytest.mark.slow
@pytest.mark.parametrize(
    ("fit", "config"),
    [(fit_spela, SpelaConfig(epochs=10)), (fit_backprop, BackpropConfig(epochs=10))],
)
def test_head_matches_linear_probe(fashion_split, fit, config):
    train_features, train_labels, test_features, test_labels, num_classes = fashion_split

    fitted = fit(train_features, train_labels, num_classes, config, seeds=[0])
    predictions = fitted.exit_scores(test_features)[0, -1].argmax(dim=-1)

    top1 = (predictions == test_labels).float().mean().item()
    assert top1 > 0.72, f"top-1 {top1:.3f}"
