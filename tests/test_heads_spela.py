"""SPELA layer functions: a hand-worked update, closed form against autograd, layer isolation."""

import math

import pytest
import torch

from spela_transfer.heads import SpelaConfig, fit_spela
from spela_transfer.heads.config import ACTIVATIONS, LOSSES
from spela_transfer.heads.fit import _init_spela_parameters
from spela_transfer.heads.spela import (
    activate,
    autograd_gradients,
    class_scores,
    closed_form_gradients,
    gather_targets,
    layer_forward,
    local_loss,
    local_loss_output_gradient,
    multiply_activation_derivative_,
    needs_pre_activation,
)

SLOPE = 0.001


def _hand_gradients(inputs, weight, bias, class_vectors, labels):
    """Work out a layer's neg_cos gradient sample by sample with scalar arithmetic only."""
    num_samples = len(inputs)
    out_width, in_width = len(weight), len(weight[0])
    weight_gradient = [[0.0] * in_width for _ in range(out_width)]
    bias_gradient = [0.0] * out_width
    outputs = []

    for a, label in zip(inputs, labels, strict=True):
        z = [sum(weight[o][i] * a[i] for i in range(in_width)) + bias[o] for o in range(out_width)]
        h = [value if value > 0 else SLOPE * value for value in z]
        outputs.append(h)

        norm = math.sqrt(sum(value * value for value in h))
        target = class_vectors[label]
        cosine = sum(h[o] * target[o] for o in range(out_width)) / norm
        for o in range(out_width):
            # d(-cos)/dh = -(v / |h| - cos * h / |h|^2), averaged over the batch.
            d_h = -(target[o] / norm - cosine * h[o] / norm**2) / num_samples
            d_z = d_h * (1.0 if z[o] > 0 else SLOPE)
            bias_gradient[o] += d_z
            for i in range(in_width):
                weight_gradient[o][i] += d_z * a[i]

    return outputs, weight_gradient, bias_gradient


def test_hand_worked_two_layer_update():
    inputs = [[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [1.0, 1.0, 0.0, -2.0]]
    labels = [0, 1, 0]
    weight_1 = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0]]
    bias_1 = [0.5, 0.5]
    vectors_1 = [[1.0, 0.0], [0.0, 1.0]]
    weight_2 = [[1.0, 1.0], [1.0, -1.0]]
    bias_2 = [0.0, 0.0]
    vectors_2 = [[0.6, 0.8], [0.8, -0.6]]
    lr = 0.1

    # Layer 1 by hand: z = (1.5, 0.5), (0.5, 2.5), (1.5, -0.5); the last one hits the leaky slope.
    hidden, hand_w1, hand_b1 = _hand_gradients(inputs, weight_1, bias_1, vectors_1, labels)
    assert hidden[2] == [1.5, -0.0005]
    # Layer 2 receives layer 1's output from before layer 1's update.
    _, hand_w2, hand_b2 = _hand_gradients(hidden, weight_2, bias_2, vectors_2, labels)

    def stacked(values):
        return torch.tensor(values, dtype=torch.float64).unsqueeze(0)

    x = torch.tensor(inputs, dtype=torch.float64)
    label_tensor = torch.tensor(labels)
    z1, h1 = layer_forward(x, stacked(weight_1), stacked(bias_1))
    targets_1 = stacked(vectors_1)[:, label_tensor]
    w1_gradient, b1_gradient = closed_form_gradients(x, z1, h1, targets_1, "neg_cos")
    z2, h2 = layer_forward(h1, stacked(weight_2), stacked(bias_2))
    targets_2 = stacked(vectors_2)[:, label_tensor]
    w2_gradient, b2_gradient = closed_form_gradients(h1, z2, h2, targets_2, "neg_cos")

    for row in range(2):
        for column in range(4):
            assert w1_gradient[0, row, column].item() == pytest.approx(
                hand_w1[row][column], abs=1e-12
            )
            new_weight = weight_1[row][column] - lr * hand_w1[row][column]
            stepped = (stacked(weight_1) - lr * w1_gradient)[0, row, column].item()
            assert stepped == pytest.approx(new_weight, abs=1e-12)
        assert b1_gradient[0, row].item() == pytest.approx(hand_b1[row], abs=1e-12)
        for column in range(2):
            assert w2_gradient[0, row, column].item() == pytest.approx(
                hand_w2[row][column], abs=1e-12
            )
        assert b2_gradient[0, row].item() == pytest.approx(hand_b2[row], abs=1e-12)

    # Layer 1's second bias gradient worked out on paper, one term per sample:
    # sample 0: h = (1.5, 0.5), cos = 1.5 / sqrt(2.5) = 0.948683,
    #   term = cos * 0.5 / 2.5 / 3 = 0.0632456;
    # sample 1: h = (0.5, 2.5), cos = 0.980581,
    #   term = -(1 / sqrt(6.5) - cos * 2.5 / 6.5) / 3 = -0.0050283;
    # sample 2: h = (1.5, -0.0005), term = 0.001 * (cos * -0.0005 / 2.25) / 3 = -0.0000001.
    assert b1_gradient[0, 1].item() == pytest.approx(0.0582172, abs=1e-6)
    assert b1_gradient[0, 0].item() == pytest.approx(hand_b1[0], abs=1e-12)


def test_fit_step_matches_functions():
    # One SGD step on one full batch of fit_spela must equal the functions applied by hand.
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(6, 5, generator=generator)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    config = SpelaConfig(
        hidden_widths=(4, 3),
        epochs=1,
        batch_size=6,
        optimizer="sgd",
        lr=0.5,
        shuffle=False,
        loss="neg_cos",
    )

    fitted = fit_spela(features, labels, 3, config, seeds=[11])
    vectors, weights, biases = _init_spela_parameters((11,), (4, 3), 5, 3, config)

    inputs = features
    for k in range(2):
        z, h = layer_forward(inputs, weights[k], biases[k])
        weight_gradient, bias_gradient = closed_form_gradients(
            inputs, z, h, vectors[k][:, labels], "neg_cos"
        )
        torch.testing.assert_close(fitted.weights[k], weights[k] - 0.5 * weight_gradient)
        torch.testing.assert_close(fitted.biases[k], biases[k] - 0.5 * bias_gradient)
        inputs = h


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shared_inputs", [True, False])
def test_closed_form_equals_autograd(loss, activation, shared_inputs):
    generator = torch.Generator().manual_seed(1)
    num_heads, batch, in_width, width, num_classes = 3, 7, 5, 4, 3
    shape = (batch, in_width) if shared_inputs else (num_heads, batch, in_width)
    inputs = torch.randn(*shape, generator=generator, dtype=torch.float64)
    weight = torch.randn(num_heads, width, in_width, generator=generator, dtype=torch.float64)
    bias = torch.randn(num_heads, width, generator=generator, dtype=torch.float64)
    vectors = torch.randn(num_heads, num_classes, width, generator=generator, dtype=torch.float64)
    vectors = vectors / vectors.norm(dim=-1, keepdim=True)
    targets = vectors[:, torch.tensor([0, 1, 2, 0, 1, 2, 0])]

    z, h = layer_forward(inputs, weight, bias, activation, 0.1)
    closed = closed_form_gradients(inputs, z, h, targets, loss, activation, 0.1)
    automatic = autograd_gradients(inputs, weight, bias, targets, loss, activation, 0.1)

    torch.testing.assert_close(closed[0], automatic[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(closed[1], automatic[1], rtol=1e-9, atol=1e-12)

    # The training step's lean path: activation in place, z dropped where it can be, and
    # the gathered targets reused as scratch space. It must give the same gradients.
    keep = needs_pre_activation(activation)
    z, h = layer_forward(inputs, weight, bias, activation, 0.1, keep_pre_activation=keep)
    assert (z is None) == (not keep)
    scratch = gather_targets(vectors, torch.tensor([0, 1, 2, 0, 1, 2, 0]), h)
    torch.testing.assert_close(scratch, targets, rtol=0, atol=0)
    lean = closed_form_gradients(
        inputs, z, h, scratch, loss, activation, 0.1, overwrite_targets=True
    )
    torch.testing.assert_close(lean[0], automatic[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(lean[1], automatic[1], rtol=1e-9, atol=1e-12)


def test_targets_follow_output_layout():
    # With shared inputs the first layer's output is stored sample-major ([N, S, W]). The
    # gathered targets must be too, so the gradient needs no copy before the weight product.
    generator = torch.Generator().manual_seed(5)
    inputs = torch.randn(6, 4, generator=generator)
    weight = torch.randn(3, 5, 4, generator=generator)
    vectors = torch.nn.functional.normalize(torch.randn(3, 2, 5, generator=generator), dim=-1)
    labels = torch.tensor([0, 1, 1, 0, 1, 0])

    _, shared_output = layer_forward(inputs, weight, torch.zeros(3, 5))
    _, stacked_output = layer_forward(shared_output, torch.randn(3, 5, 5), torch.zeros(3, 5))

    for output in (shared_output, stacked_output):
        targets = gather_targets(vectors, labels, output)
        assert targets.stride() == output.stride()
        torch.testing.assert_close(targets, vectors[:, labels], rtol=0, atol=0)


def test_gelu_derivative_needs_pre_activation():
    output = torch.ones(1, 2, 3)
    with pytest.raises(ValueError, match="GELU derivative needs the pre-activation"):
        multiply_activation_derivative_(output.clone(), None, output, "gelu", SLOPE)


def test_closed_form_equals_autograd_in_float32():
    generator = torch.Generator().manual_seed(2)
    inputs = torch.randn(32, 64, generator=generator)
    weight = torch.randn(2, 16, 64, generator=generator) * 0.2
    bias = torch.zeros(2, 16)
    vectors = torch.nn.functional.normalize(torch.randn(2, 4, 16, generator=generator), dim=-1)
    targets = vectors[:, torch.arange(32) % 4]

    z, h = layer_forward(inputs, weight, bias)
    closed = closed_form_gradients(inputs, z, h, targets, "log2cos")
    automatic = autograd_gradients(inputs, weight, bias, targets, "log2cos")

    torch.testing.assert_close(closed[0], automatic[0], rtol=1e-4, atol=1e-6)


def test_no_gradient_reaches_previous_layer():
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(8, 6, generator=generator)
    weight_1 = torch.randn(1, 5, 6, generator=generator, requires_grad=True)
    bias_1 = torch.zeros(1, 5, requires_grad=True)
    weight_2 = torch.randn(1, 4, 5, generator=generator)
    targets = torch.nn.functional.normalize(torch.randn(1, 8, 4, generator=generator), dim=-1)

    # Layer 1's output carries a graph back to weight_1; layer 2's update must not use it.
    _, hidden = layer_forward(inputs, weight_1, bias_1)
    autograd_gradients(hidden, weight_2, torch.zeros(1, 4), targets, "log2cos")

    assert weight_1.grad is None
    assert bias_1.grad is None


@pytest.mark.parametrize("loop_order", ["per_batch", "layerwise"])
@pytest.mark.parametrize("update", ["closed_form", "autograd"])
def test_second_layer_leaves_first_unchanged(loop_order, update):
    # Layer 1 of a two-layer head must train exactly like a one-layer head because layer 2
    # never changes it.
    generator = torch.Generator().manual_seed(4)
    features = torch.randn(40, 12, generator=generator)
    labels = torch.arange(40) % 4
    common = {"epochs": 3, "batch_size": 8, "loop_order": loop_order, "update": update}

    two_layers = fit_spela(
        features, labels, 4, SpelaConfig(hidden_widths=(10, 6), **common), seeds=[5]
    )
    one_layer = fit_spela(
        features, labels, 4, SpelaConfig(hidden_widths=(10,), **common), seeds=[5]
    )

    assert torch.equal(two_layers.weights[0], one_layer.weights[0])
    assert torch.equal(two_layers.biases[0], one_layer.biases[0])


def test_local_loss_values():
    output = torch.tensor([[[3.0, 4.0], [0.0, 2.0]]])
    targets = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])

    # Cosines are 0.6 and 1.0.
    assert local_loss(output, targets, "neg_cos").item() == pytest.approx(-0.8)
    assert local_loss(output, targets, "log2cos").item() == pytest.approx((math.log(1.4) + 0.0) / 2)
    assert local_loss(output, targets, "euclidean").item() == pytest.approx(math.sqrt(0.8) / 2)


def test_class_scores_are_cosines():
    output = torch.tensor([[[3.0, 4.0]]])
    vectors = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])

    torch.testing.assert_close(class_scores(output, vectors), torch.tensor([[[0.6, 0.8, -0.6]]]))


def test_activation_rejects_unknown_name():
    z = torch.zeros(2)
    with pytest.raises(ValueError, match="activation must be one of 'leaky_relu', .*; got 'swish'"):
        activate(z, "swish", SLOPE)
    with pytest.raises(ValueError, match="activation must be one of .*; got 'swish'"):
        multiply_activation_derivative_(z.clone(), z, z, "swish", SLOPE)


def test_loss_rejects_unknown_name():
    output = torch.ones(1, 2, 3)
    with pytest.raises(
        ValueError, match="loss must be one of 'neg_cos', 'log2cos', 'euclidean'; got 'mse'"
    ):
        local_loss(output, output, "mse")
    with pytest.raises(ValueError, match="loss must be one of .*; got 'mse'"):
        local_loss_output_gradient(output, output, "mse")
