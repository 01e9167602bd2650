"""Numerical steps of a SPELA layer as plain functions over tensors.

Every function works on seeds stacked along the first axis, so a single head is
the case S = 1. A layer maps inputs `a` to `h = act(a @ W.T + b)` and learns from a
local loss on `cos(h, v[label])`, where `v` are the layer's fixed class vectors.
No function here builds an autograd graph that spans two layers: the inputs are
always plain tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import ACTIVATIONS, LOSSES

# Guards divisions by a norm; a zero activation vector gets zero cosine and zero gradient.
NORM_EPS = 1e-12


def activate(pre_activation: torch.Tensor, activation: str, negative_slope: float) -> torch.Tensor:
    """Apply the named activation elementwise."""
    if activation == "leaky_relu":
        return F.leaky_relu(pre_activation, negative_slope)
    if activation == "relu":
        return torch.relu(pre_activation)
    if activation == "tanh":
        return torch.tanh(pre_activation)
    if activation == "sigmoid":
        return torch.sigmoid(pre_activation)
    if activation == "gelu":
        return F.gelu(pre_activation)
    if activation == "identity":
        return pre_activation
    raise ValueError(
        f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}; got {activation!r}"
    )


def activation_derivative(
    pre_activation: torch.Tensor, output: torch.Tensor, activation: str, negative_slope: float
) -> torch.Tensor:
    """Return d act(z) / dz elementwise, from the pre-activation `z` and the output `act(z)`."""
    if activation == "leaky_relu":
        one = pre_activation.new_ones(())
        return torch.where(pre_activation > 0, one, one * negative_slope)
    if activation == "relu":
        return (pre_activation > 0).to(pre_activation.dtype)
    if activation == "tanh":
        return 1.0 - output * output
    if activation == "sigmoid":
        return output * (1.0 - output)
    if activation == "gelu":
        # Exact GELU: d/dz [z * Phi(z)] = Phi(z) + z * phi(z).
        cdf = 0.5 * (1.0 + torch.erf(pre_activation / math.sqrt(2.0)))
        pdf = torch.exp(-0.5 * pre_activation * pre_activation) / math.sqrt(2.0 * math.pi)
        return cdf + pre_activation * pdf
    if activation == "identity":
        return torch.ones_like(pre_activation)
    raise ValueError(
        f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}; got {activation!r}"
    )


def l2_normalize(values: torch.Tensor) -> torch.Tensor:
    """Scale each row (last axis) of `values` to unit L2 norm; zero rows stay zero."""
    return values / values.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)


def layer_forward(
    inputs: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    activation: str = "leaky_relu",
    negative_slope: float = 0.001,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute one layer of S stacked heads.

    Args:
        inputs: Layer inputs, either [N, D_in] shared by every head (the first layer)
            or [S, N, D_in], one per head. Normalise them beforehand if the head does.
        weight: Weights [S, D_out, D_in].
        bias: Biases [S, D_out].
        activation: Activation name.
        negative_slope: Slope of `leaky_relu` below zero.

    Returns:
        The pre-activation `z` and the activation `h = act(z)`, both [S, N, D_out].
    """
    num_heads, width, in_width = weight.shape

    if inputs.dim() == 2:
        # One matrix product serves every head: [N, D_in] @ [D_in, S * D_out].
        flat = torch.addmm(bias.reshape(-1), inputs, weight.reshape(num_heads * width, in_width).T)
        pre_activation = flat.view(-1, num_heads, width).transpose(0, 1)
    else:
        pre_activation = torch.baddbmm(bias.unsqueeze(1), inputs, weight.transpose(1, 2))

    return pre_activation, activate(pre_activation, activation, negative_slope)


def cosine_to_targets(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Return `cos(h, v)` row by row: output and unit targets [S, N, W] give [S, N]."""
    norms = output.norm(dim=-1).clamp_min(NORM_EPS)
    return (output * targets).sum(dim=-1) / norms


def local_loss(output: torch.Tensor, targets: torch.Tensor, loss: str) -> torch.Tensor:
    """Return the local loss of each head, averaged over the batch.

    Args:
        output: Layer activations h [S, N, W].
        targets: The class vector of each sample's label, unit norm, [S, N, W].
        loss: `neg_cos` (-c), `log2cos` (log(2 - c)) or `euclidean` (|h/|h| - v|).

    Returns:
        Loss per head [S].
    """
    if loss == "euclidean":
        return (l2_normalize(output) - targets).norm(dim=-1).mean(dim=-1)

    cosines = cosine_to_targets(output, targets)
    if loss == "neg_cos":
        return -cosines.mean(dim=-1)
    if loss == "log2cos":
        return torch.log(2.0 - cosines).mean(dim=-1)
    raise ValueError(f"loss must be one of {', '.join(map(repr, LOSSES))}; got {loss!r}")


def local_loss_output_gradient(
    output: torch.Tensor, targets: torch.Tensor, loss: str
) -> torch.Tensor:
    """Return d local_loss / d h in closed form, [S, N, W].

    Every loss is a function f of c = cos(h, v), and d c / d h = (v - c u) / |h| with
    u = h / |h|, so the gradient is f'(c) (v - c u) / (|h| N). For `euclidean`,
    f = |u - v| = sqrt(2 - 2c) gives f'(c) = -1 / |u - v|.
    """
    batch_size = output.shape[-2]
    norms = output.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    cosines = torch.linalg.vecdot(output, targets).unsqueeze(-1) / norms

    if loss == "neg_cos":
        slope = torch.full_like(cosines, -1.0)
    elif loss == "log2cos":
        slope = -1.0 / (2.0 - cosines)
    elif loss == "euclidean":
        slope = -1.0 / (2.0 - 2.0 * cosines).clamp_min(0.0).sqrt().clamp_min(NORM_EPS)
    else:
        raise ValueError(f"loss must be one of {', '.join(map(repr, LOSSES))}; got {loss!r}")

    # Two passes over [S, N, W]: h * (-c f' / (|h|^2 N)), then + v * f' / (|h| N).
    scale = slope / (norms * batch_size)
    gradient = output * (-cosines * scale / norms)
    return gradient.addcmul_(targets, scale)


def closed_form_gradients(
    inputs: torch.Tensor,
    pre_activation: torch.Tensor,
    output: torch.Tensor,
    targets: torch.Tensor,
    loss: str,
    activation: str = "leaky_relu",
    negative_slope: float = 0.001,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute the gradient of each head's local loss with respect to its weight and bias.

    Args:
        inputs: The layer inputs given to `layer_forward`, [N, D_in] or [S, N, D_in].
        pre_activation: `z` from `layer_forward`, [S, N, D_out].
        output: `h` from `layer_forward`, [S, N, D_out].
        targets: Class vector of each sample's label [S, N, D_out].
        loss: Local loss name.
        activation: Activation name.
        negative_slope: Slope of `leaky_relu` below zero.
        out: Contiguous tensors [S, D_out, D_in] and [S, D_out] to write the gradients
            into, which saves allocating a weight-sized tensor on every step.

    Returns:
        Weight gradient [S, D_out, D_in] and bias gradient [S, D_out] (`out` if given).
    """
    output_gradient = local_loss_output_gradient(output, targets, loss)
    pre_activation_gradient = output_gradient.mul_(
        activation_derivative(pre_activation, output, activation, negative_slope)
    )
    num_heads, batch_size, width = pre_activation_gradient.shape
    if out is None:
        out = (
            inputs.new_empty(num_heads, width, inputs.shape[-1]),
            inputs.new_empty(num_heads, width),
        )
    weight_gradient, bias_gradient = out

    if inputs.dim() == 2:
        # Shared inputs: all heads' weight gradients come from one [S * D_out, N] @ [N, D_in].
        flat = pre_activation_gradient.transpose(0, 1).reshape(batch_size, num_heads * width)
        torch.mm(flat.T, inputs, out=weight_gradient.view(num_heads * width, -1))
    else:
        torch.bmm(pre_activation_gradient.transpose(1, 2), inputs, out=weight_gradient)

    torch.sum(pre_activation_gradient, dim=1, out=bias_gradient)
    return weight_gradient, bias_gradient


def autograd_gradients(
    inputs: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    targets: torch.Tensor,
    loss: str,
    activation: str = "leaky_relu",
    negative_slope: float = 0.001,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute the same gradients as `closed_form_gradients` by letting torch differentiate.

    The graph starts at detached copies of `weight` and `bias`, so nothing outside
    this layer receives a gradient.
    """
    weight = weight.detach().requires_grad_(True)
    bias = bias.detach().requires_grad_(True)
    with torch.enable_grad():
        _, output = layer_forward(inputs.detach(), weight, bias, activation, negative_slope)
        total = local_loss(output, targets, loss).sum()
        weight_gradient, bias_gradient = torch.autograd.grad(total, (weight, bias))
    return weight_gradient, bias_gradient


def class_scores(output: torch.Tensor, class_vectors: torch.Tensor) -> torch.Tensor:
    """Return the cosine of every activation row to every class vector.

    Args:
        output: Layer activations [S, N, W].
        class_vectors: Unit class vectors of the layer [S, C, W].

    Returns:
        Scores [S, N, C]; the predicted class is the argmax over the last axis.
    """
    return torch.bmm(l2_normalize(output), class_vectors.transpose(1, 2))
