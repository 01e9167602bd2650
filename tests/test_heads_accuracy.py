"""Both heads on real features: the offline backbone on the Fashion-MNIST sample."""

import pytest
import torch
from sklearn.model_selection import train_test_split

from spela_transfer.heads import BackpropConfig, SpelaConfig, fit_backprop, fit_spela


@pytest.fixture(scope="module")
def fashion_split(sample_features):
    """Split the 5,000 sample features in halves for training and testing."""
    features = torch.from_numpy(sample_features.load_features())
    labels = torch.from_numpy(sample_features.labels).long()
    train, test = train_test_split(torch.arange(len(labels)), test_size=0.5, random_state=100)
    return (
        features[train],
        labels[train],
        features[test],
        labels[test],
        sample_features.num_classes,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fit", "config"),
    [(fit_spela, SpelaConfig(epochs=10)), (fit_backprop, BackpropConfig(epochs=10))],
    ids=["spela", "backprop"],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_head_top1_above_80_percent(fashion_split, fit, config, seed):
    train_features, train_labels, test_features, test_labels, num_classes = fashion_split

    fitted = fit(train_features, train_labels, num_classes, config, seeds=[seed])
    predictions = fitted.exit_scores(test_features)[0, -1].argmax(dim=-1)

    top1 = (predictions == test_labels).float().mean().item()
    assert top1 > 0.80, f"top-1 {top1:.3f} at test size 0.5"
