"""Numerical steps of a SPELA layer as plain functions over tensors.

Every function works on seeds stacked along the first axis, so a single head is
the case S = 1. A layer maps inputs `a` to `h = act(a @ W.T + b)` and learns from a
local loss on `cos(h, v[label])`, where `v` are the layer's fixed class vectors.
No function here builds an autograd graph that spans two layers: the inputs are
always plain tensors.
"""

from __future__ import annotations

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


def activate_(pre_activation: torch.Tensor, activation: str, negative_slope: float) -> torch.Tensor:
    """Apply the named activation in place and return the same tensor."""
    if activation == "leaky_relu":
        return F.leaky_relu_(pre_activation, negative_slope)
    if activation == "relu":
        return pre_activation.relu_()
    if activation == "tanh":
        return pre_activation.tanh_()
    if activation == "sigmoid":
        return pre_activation.sigmoid_()
    if activation == "identity":
        return pre_activation
    # GELU has no in-place form in torch, and its derivative needs the pre-activation anyway.
    return activate(pre_activation, activation, negative_slope)


def needs_pre_activation(activation: str) -> bool:
    """Return whether act'(z) cannot be read off act(z), so a training step must keep z.

    LeakyReLU with a slope in [0, 1), ReLU, tanh, sigmoid and identity give their
    derivative from the output alone. GELU does not.
    """
    return activation == "gelu"


def multiply_activation_derivative_(
    gradient: torch.Tensor,
    pre_activation: torch.Tensor | None,
    output: torch.Tensor,
    activation: str,
    negative_slope: float,
) -> torch.Tensor:
    """Multiply `gradient` in place by d act(z) / dz and return it.

    This is the step from d loss / d h to d loss / d z. It runs torch's own
    activation backward kernels, the ones autograd calls, with `gradient` as their
    output, so no derivative tensor is allocated. `z` may be None for every
    activation but GELU (see `needs_pre_activation`), because the others read the
    derivative off the output. For LeakyReLU that needs a slope in [0, 1), which
    `SpelaConfig` checks.
    """
    aten = torch.ops.aten
    if activation == "leaky_relu":
        return aten.leaky_relu_backward.grad_input(
            gradient, output, negative_slope, True, grad_input=gradient
        )
    if activation == "relu":
        return aten.threshold_backward.grad_input(gradient, output, 0, grad_input=gradient)
    if activation == "tanh":
        return aten.tanh_backward.grad_input(gradient, output, grad_input=gradient)
    if activation == "sigmoid":
        return aten.sigmoid_backward.grad_input(gradient, output, grad_input=gradient)
    if activation == "gelu":
        if pre_activation is None:
            raise ValueError("the GELU derivative needs the pre-activation; pass z, not None")
        return aten.gelu_backward.grad_input(gradient, pre_activation, grad_input=gradient)
    if activation == "identity":
        return gradient
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
    keep_pre_activation: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Compute one layer of S stacked heads.

    Args:
        inputs: Layer inputs, either [N, D_in] shared by every head (the first layer)
            or [S, N, D_in], one per head. Normalise them beforehand if the head does.
        weight: Weights [S, D_out, D_in].
        bias: Biases [S, D_out].
        activation: Activation name.
        negative_slope: Slope of `leaky_relu` below zero.
        keep_pre_activation: False applies the activation in place and returns None
            for `z`, which saves one [S, N, D_out] tensor when nothing needs `z` (see
            `needs_pre_activation`). Not for tensors that autograd differentiates.

    Returns:
        The pre-activation `z` (or None) and the activation `h = act(z)`, both
        [S, N, D_out]. With shared inputs they are views of one [N, S * D_out] matrix.
    """
    num_heads, width, in_width = weight.shape

    if inputs.dim() == 2:
        # One matrix product serves every head: [N, D_in] @ [D_in, S * D_out].
        flat = torch.addmm(bias.reshape(-1), inputs, weight.reshape(num_heads * width, in_width).T)
        pre_activation = flat.view(-1, num_heads, width).transpose(0, 1)
    else:
        pre_activation = torch.baddbmm(bias.unsqueeze(1), inputs, weight.transpose(1, 2))

    if keep_pre_activation:
        return pre_activation, activate(pre_activation, activation, negative_slope)
    return None, activate_(pre_activation, activation, negative_slope)


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
    output: torch.Tensor, targets: torch.Tensor, loss: str, overwrite_targets: bool = False
) -> torch.Tensor:
    """Return d local_loss / d h in closed form, [S, N, W].

    Every loss is a function f of c = cos(h, v), and d c / d h = (v - c u) / |h| with
    u = h / |h|, so the gradient is f'(c) (v - c u) / (|h| N). For `euclidean`,
    f = |u - v| = sqrt(2 - 2c) gives f'(c) = -1 / |u - v|.

    Args:
        output: Layer activations h [S, N, W].
        targets: The class vector of each sample's label, unit norm, [S, N, W].
        loss: Local loss name.
        overwrite_targets: Write the gradient into `targets` and return it, instead
            of allocating a new tensor.
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

    # One pass over [S, N, W] computes v * f' / (|h| N) + h * (-c f' / (|h|^2 N)). Both
    # factors are per row, [S, N, 1].
    scale = slope / (norms * batch_size)
    gradient = targets if overwrite_targets else targets.clone()
    return gradient.mul_(scale).addcmul_(output, -cosines * scale / norms)


def gather_targets(
    class_vectors: torch.Tensor, labels: torch.Tensor, like: torch.Tensor
) -> torch.Tensor:
    """Return each sample's class vector, `class_vectors[:, labels]` [S, N, W].

    The result has the memory layout of `like` (an output of `layer_forward`), so a
    gradient computed in its place feeds the weight-gradient product without a copy.
    """
    if like.dim() == 3 and like.stride(0) < like.stride(1):
        # `like` is stored sample-major, [N, S, W], as the shared-input product leaves it.
        return class_vectors.transpose(0, 1)[labels].transpose(0, 1)
    return class_vectors[:, labels]


def closed_form_gradients(
    inputs: torch.Tensor,
    pre_activation: torch.Tensor | None,
    output: torch.Tensor,
    targets: torch.Tensor,
    loss: str,
    activation: str = "leaky_relu",
    negative_slope: float = 0.001,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    overwrite_targets: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute the gradient of each head's local loss with respect to its weight and bias.

    Args:
        inputs: The layer inputs given to `layer_forward`, [N, D_in] or [S, N, D_in].
        pre_activation: `z` from `layer_forward`, [S, N, D_out], or None unless the
            activation is GELU.
        output: `h` from `layer_forward`, [S, N, D_out].
        targets: Class vector of each sample's label [S, N, D_out] (`gather_targets`).
        loss: Local loss name.
        activation: Activation name.
        negative_slope: Slope of `leaky_relu` below zero.
        out: Contiguous tensors [S, D_out, D_in] and [S, D_out] to write the gradients
            into, which saves allocating a weight-sized tensor on every step.
        overwrite_targets: Use `targets` as scratch space for the gradient with
            respect to `z`, which saves one [S, N, D_out] tensor; `targets` is then
            garbage.

    Returns:
        Weight gradient [S, D_out, D_in] and bias gradient [S, D_out] (`out` if given).
    """
    pre_activation_gradient = multiply_activation_derivative_(
        local_loss_output_gradient(output, targets, loss, overwrite_targets),
        pre_activation,
        output,
        activation,
        negative_slope,
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
        # The reshape is a view when the gradient is stored sample-major ([N, S, D_out]).
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
