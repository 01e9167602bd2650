"""Training SPELA and backprop heads: seeds, batched seeds, loop orders, ablations, exits."""

import logging

import pytest
import torch

from spela_transfer.heads import BackpropConfig, SpelaConfig, fit_backprop, fit_spela


def _toy_problem(num_samples=120, num_features=16, num_classes=4, seed=0):
    """Gaussian clusters around one random centre per class: easy, but not trivially separable."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, num_features, generator=generator) * 2
    labels = torch.arange(num_samples) % num_classes
    features = centres[labels] + torch.randn(num_samples, num_features, generator=generator)
    return features, labels


SMALL_SPELA = SpelaConfig(hidden_widths=(64, 32), epochs=10, batch_size=16, lr=1e-2)
SMALL_BACKPROP = BackpropConfig(hidden_widths=(64, 32), epochs=10, batch_size=16, lr=1e-2)


@pytest.mark.parametrize(
    ("fit", "config"), [(fit_spela, SMALL_SPELA), (fit_backprop, SMALL_BACKPROP)]
)
def test_same_seed_bit_identical(fit, config):
    features, labels = _toy_problem()

    first = fit(features, labels, 4, config, seeds=[7])
    again = fit(features, labels, 4, config, seeds=[7])
    other = fit(features, labels, 4, config, seeds=[8])

    for weight, weight_again in zip(first.weights, again.weights, strict=True):
        assert torch.equal(weight, weight_again)
    assert torch.equal(first.exit_scores(features), again.exit_scores(features))
    assert not torch.equal(first.weights[0], other.weights[0])


@pytest.mark.parametrize(
    ("fit", "config"), [(fit_spela, SMALL_SPELA), (fit_backprop, SMALL_BACKPROP)]
)
def test_batched_seeds_match_separate_fits(fit, config):
    # Without shuffling every call gets the same batches, so head s of a batched fit
    # follows the same path as a fit of seed s alone, up to float rounding.
    features, labels = _toy_problem()
    config = type(config)(**{**config.__dict__, "shuffle": False})

    batched = fit(features, labels, 4, config, seeds=[3, 9])
    alone = fit(features, labels, 4, config, seeds=[9])

    for stacked, single in zip(batched.weights, alone.weights, strict=True):
        torch.testing.assert_close(stacked[1], single[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        batched.exit_scores(features)[1], alone.exit_scores(features)[0], rtol=1e-4, atol=1e-4
    )


def test_spela_exit_scores_shape_and_accuracy():
    features, labels = _toy_problem()

    fitted = fit_spela(features, labels, 4, SMALL_SPELA, seeds=[0, 1, 2])
    scores = fitted.exit_scores(features)

    assert fitted.exit_layers == ("layer1", "layer2")
    assert fitted.seeds == (0, 1, 2)
    assert scores.shape == (3, 2, 120, 4)
    assert scores.dtype == torch.float32
    assert scores.device.type == "cpu"
    assert scores.abs().max() <= 1.0 + 1e-5
    accuracy = (scores.argmax(dim=-1) == labels).float().mean(dim=-1)
    assert bool((accuracy > 0.85).all()), accuracy


def test_backprop_exit_scores_are_logits():
    features, labels = _toy_problem()

    fitted = fit_backprop(features, labels, 4, SMALL_BACKPROP, seeds=[0, 1])
    scores = fitted.exit_scores(features)

    assert fitted.exit_layers == ("output",)
    assert scores.shape == (2, 1, 120, 4)
    assert [weight.shape[1] for weight in fitted.weights] == [64, 32, 4]
    accuracy = (scores.argmax(dim=-1) == labels).float().mean(dim=-1)
    assert bool((accuracy > 0.85).all()), accuracy


def test_exit_scores_in_chunks_equal_whole():
    features, labels = _toy_problem()
    fitted = fit_spela(features, labels, 4, SMALL_SPELA, seeds=[0])

    whole = fitted.exit_scores(features)
    parts = torch.cat([fitted.exit_scores(features[:50]), fitted.exit_scores(features[50:])], dim=2)

    torch.testing.assert_close(whole, parts)
    assert fitted.exit_scores(features[:0]).shape == (1, 2, 0, 4)


def test_default_widths_follow_class_count():
    features, labels = _toy_problem(num_samples=60, num_features=8, num_classes=3)
    narrow = fit_spela(features, labels, 3, SpelaConfig(epochs=1), seeds=[0])

    many_labels = torch.arange(60)
    wide = fit_backprop(features, many_labels, 60, BackpropConfig(epochs=1), seeds=[0])

    assert [weight.shape[1] for weight in narrow.weights] == [512, 64]
    assert [weight.shape[1] for weight in wide.weights] == [1024, 1024, 60]


@pytest.mark.parametrize("loss", ["neg_cos", "log2cos", "euclidean"])
@pytest.mark.parametrize("normalize_input", [False, True])
def test_spela_variants_learn(loss, normalize_input):
    features, labels = _toy_problem()
    config = SpelaConfig(
        hidden_widths=(64, 32),
        epochs=10,
        batch_size=16,
        lr=1e-2,
        loss=loss,
        normalize_input=normalize_input,
    )

    scores = fit_spela(features, labels, 4, config, seeds=[0]).exit_scores(features)

    accuracy = (scores[0, -1].argmax(dim=-1) == labels).float().mean()
    assert accuracy > 0.85


def test_layerwise_learns():
    features, labels = _toy_problem()
    config = SpelaConfig(
        hidden_widths=(64, 32), epochs=10, batch_size=16, lr=1e-2, loop_order="layerwise"
    )

    scores = fit_spela(features, labels, 4, config, seeds=[0]).exit_scores(features)

    assert (scores[0, -1].argmax(dim=-1) == labels).float().mean() > 0.85


@pytest.mark.parametrize("loop_order", ["per_batch", "layerwise"])
def test_autograd_update_matches_closed_form(loop_order):
    features, labels = _toy_problem()
    closed = SpelaConfig(**{**SMALL_SPELA.__dict__, "loop_order": loop_order})
    automatic = SpelaConfig(**{**closed.__dict__, "update": "autograd"})

    first = fit_spela(features, labels, 4, closed, seeds=[0])
    second = fit_spela(features, labels, 4, automatic, seeds=[0])

    for weight, other in zip(first.weights, second.weights, strict=True):
        torch.testing.assert_close(weight, other, rtol=1e-4, atol=1e-5)


def test_binarized_weights_are_signs():
    features, labels = _toy_problem()
    config = SpelaConfig(hidden_widths=(64, 32), epochs=2, batch_size=16, binarize_weights=True)

    fitted = fit_spela(features, labels, 4, config, seeds=[0])

    for weight, bias in zip(fitted.weights, fitted.biases, strict=True):
        assert set(weight.unique().tolist()) <= {-1.0, 0.0, 1.0}
        assert not set(bias.unique().tolist()) <= {-1.0, 0.0, 1.0}


def test_step_schedule_decays_lr():
    # With the learning rate cut to almost nothing after epoch 1, epoch 2 barely moves the weights.
    features, labels = _toy_problem()
    common = {
        "hidden_widths": (64, 32),
        "batch_size": 16,
        "optimizer": "sgd",
        "lr": 0.5,
        "momentum": 0.5,
    }
    decayed = SpelaConfig(epochs=2, lr_step_epochs=1, lr_gamma=1e-9, **common)

    two_epochs = fit_spela(features, labels, 4, decayed, seeds=[0])
    one_epoch = fit_spela(features, labels, 4, SpelaConfig(epochs=1, **common), seeds=[0])
    constant = fit_spela(features, labels, 4, SpelaConfig(epochs=2, **common), seeds=[0])

    torch.testing.assert_close(two_epochs.weights[0], one_epoch.weights[0], rtol=0, atol=1e-6)
    assert not torch.allclose(constant.weights[0], one_epoch.weights[0], atol=1e-3)


def test_gaussian_class_vectors_report_cosine():
    features, labels = _toy_problem()
    config = SpelaConfig(hidden_widths=(64, 32), epochs=1, class_vectors="gaussian")

    fitted = fit_spela(features, labels, 4, config, seeds=[0, 1])

    assert len(fitted.max_class_cosine) == 2
    assert fitted.max_class_cosine[1] > -1 / 3 + 1e-3


def test_coulomb_vectors_logged_when_classes_exceed_width(caplog):
    features, labels = _toy_problem(num_samples=60, num_classes=6)
    config = SpelaConfig(hidden_widths=(16, 3), epochs=1, coulomb_steps=100)

    with caplog.at_level(logging.INFO, logger="spela_transfer.heads.fit"):
        fitted = fit_spela(features, labels, 6, config, seeds=[0])

    assert fitted.max_class_cosine[0] == pytest.approx(-0.2, abs=1e-5)
    assert fitted.max_class_cosine[1] < 0.6
    assert "layer2: 6 classes exceed width 3 + 1" in caplog.text


def test_crowded_class_vectors_warn():
    # 20 classes on a 2-sphere: no arrangement keeps every pair below cosine 0.5.
    features, labels = _toy_problem(num_samples=60, num_classes=20)
    config = SpelaConfig(hidden_widths=(16, 3), epochs=1, coulomb_steps=100)

    with pytest.warns(UserWarning, match="layer2: 20 classes exceed width 3 \\+ 1") as caught:
        fit_spela(features, labels, 20, config, seeds=[0])

    assert len(caught) == 1
    assert "widen it to at least 19 in hidden_widths" in str(caught[0].message)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize(
    ("fit", "config"), [(fit_spela, SMALL_SPELA), (fit_backprop, SMALL_BACKPROP)]
)
def test_cuda_matches_cpu(fit, config):
    features, labels = _toy_problem()

    on_cpu = fit(features, labels, 4, config, seeds=[0])
    on_cuda = fit(features, labels, 4, config, seeds=[0], device="cuda")

    assert on_cuda.device.type == "cuda"
    torch.testing.assert_close(
        on_cuda.exit_scores(features), on_cpu.exit_scores(features), rtol=1e-3, atol=1e-3
    )
