"""The backprop baseline head as plain functions: an MLP trained end to end.

Hidden layers are the SPELA layers' shape (linear map and activation); one more
linear layer maps the last hidden width to `C` logits. Heads are stacked along a
leading axis as in `spela.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .spela import layer_forward


def backprop_logits(
    features: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    activation: str = "leaky_relu",
    negative_slope: float = 0.001,
) -> torch.Tensor:
    """Run S stacked MLPs on shared features.

    Args:
        features: Inputs [N, D], the same for every head.
        weights: Per layer [S, D_out, D_in]; the last layer gives the logits.
        biases: Per layer [S, D_out].
        activation: Activation of the hidden layers.
        negative_slope: Slope of `leaky_relu` below zero.

    Returns:
        Logits [S, N, C].
    """
    hidden: torch.Tensor = features
    for weight, bias in zip(weights[:-1], biases[:-1], strict=True):
        _, hidden = layer_forward(hidden, weight, bias, activation, negative_slope)

    if hidden.dim() == 2:
        hidden = hidden.unsqueeze(0).expand(weights[-1].shape[0], -1, -1)
    return torch.baddbmm(biases[-1].unsqueeze(1), hidden, weights[-1].transpose(1, 2))


def backprop_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Return the softmax cross-entropy of each head, averaged over the batch.

    Args:
        logits: [S, N, C].
        labels: Class indices [N].

    Returns:
        Loss per head [S]. Summing them keeps every head's gradient its own.
    """
    num_heads, batch_size, num_classes = logits.shape
    per_sample = F.cross_entropy(
        logits.reshape(num_heads * batch_size, num_classes),
        labels.repeat(num_heads),
        reduction="none",
    )
    return per_sample.view(num_heads, batch_size).mean(dim=1)
