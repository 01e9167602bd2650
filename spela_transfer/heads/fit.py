"""Training of SPELA and backprop heads, several seeds at once, and their fitted state.

Each call trains one head per seed in a single pass over the data. The first layer
of all heads is one matrix product ([N, D] @ [D, S * width]). Later layers are
batched products over stacked weights [S, D_out, D_in].

Seeds and randomness: head `s` draws its class vectors and initial weights from
`torch.Generator().manual_seed(seeds[s])`, so they do not depend on the other
seeds of the call. The batch order is shared by all heads of a call and drawn from
a stream derived from `seeds[0]`. A one-seed call is therefore fully determined by
its seed, and on the CPU the same seed gives bit-identical weights and scores. A
head trained inside a multi-seed call matches a one-seed call only in its init;
its batch order comes from the first seed.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._batched import (
    batch_indices,
    check_device,
    check_seeds,
    check_training_inputs,
    kaiming_normal,
    make_optimizer,
    shuffle_generator,
)
from .backprop import backprop_logits, backprop_loss
from .class_vectors import make_class_vectors, max_pairwise_cosine
from .config import BackpropConfig, SpelaConfig, resolve_hidden_widths
from .spela import (
    autograd_gradients,
    class_scores,
    closed_form_gradients,
    gather_targets,
    l2_normalize,
    layer_forward,
    needs_pre_activation,
)

logger = logging.getLogger(__name__)

# Rows per forward pass at inference, which bounds the memory of exit_scores.
INFERENCE_BATCH_SIZE = 4096
# Above this largest pairwise cosine (class vectors less than 60 degrees apart), a fit
# warns that the layer's width crowds its class vectors. A width of at least C - 1 gives a
# regular simplex, whose pairwise cosines are all -1/(C-1).
CROWDED_CLASS_COSINE = 0.5


@dataclass(frozen=True, eq=False)
class FittedHeads:
    """Trained heads of one kind, one per seed, with stacked parameters.

    Attributes:
        kind: `spela` or `backprop`.
        seeds: Seed of each head, in stacking order.
        exit_layers: Names of the layers that give scores: `layer1`, `layer2`, ... for
            SPELA, `output` for backprop.
        weights: Per layer [S, D_out, D_in], on the device the heads were trained on.
        biases: Per layer [S, D_out].
        class_vectors: SPELA only, per layer [S, C, D_out]; empty for backprop.
        max_class_cosine: SPELA only, the largest pairwise cosine between the class
            vectors of each layer (over all seeds); -1/(C-1) for a regular simplex.
        num_features: Feature width D the heads expect.
        num_classes: Class count C.
        activation: Activation name.
        negative_slope: Slope of `leaky_relu` below zero.
        normalize_input: Whether each SPELA layer L2-normalises its input.
    """

    kind: str
    seeds: tuple[int, ...]
    exit_layers: tuple[str, ...]
    weights: tuple[torch.Tensor, ...]
    biases: tuple[torch.Tensor, ...]
    class_vectors: tuple[torch.Tensor, ...]
    max_class_cosine: tuple[float, ...]
    num_features: int
    num_classes: int
    activation: str
    negative_slope: float
    normalize_input: bool

    @property
    def device(self) -> torch.device:
        """Device that stores the parameters and runs inference."""
        return self.weights[0].device

    def exit_scores(
        self, features: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Score features at every exit layer of every head.

        SPELA scores are the cosines to each layer's class vectors; backprop scores
        are the logits. The argmax over the last axis is the prediction.

        Args:
            features: [N, D] with D = num_features, a tensor or numpy array.
            dtype: Precision of the arithmetic and of the scores. float64 makes a
                row's scores independent of the other rows in the call up to ~1e-15,
                where float32 matrix products may round differently by ~1e-7.

        Returns:
            Scores [S, L, N, C] of `dtype` on the CPU, L = len(exit_layers).

        Raises:
            ValueError: Wrong shape or width, or NaN or inf in features.
        """
        features = torch.as_tensor(features)
        if features.dim() != 2 or features.shape[1] != self.num_features:
            raise ValueError(
                f"features must have shape [N, {self.num_features}] like the training features, "
                f"got {tuple(features.shape)}; pass features from the same backbone"
            )
        if not bool(torch.isfinite(features).all()):
            raise ValueError("features contain NaN or inf; drop or impute those samples first")

        chunks = []
        with torch.no_grad():
            weights = [weight.to(dtype) for weight in self.weights]
            biases = [bias.to(dtype) for bias in self.biases]
            class_vectors = [vectors.to(dtype) for vectors in self.class_vectors]
            for start in range(0, features.shape[0], INFERENCE_BATCH_SIZE):
                rows = features[start : start + INFERENCE_BATCH_SIZE].to(self.device, dtype)
                chunks.append(self._score_rows(rows, weights, biases, class_vectors).cpu())

        if not chunks:
            shape = (len(self.seeds), len(self.exit_layers), 0, self.num_classes)
            return torch.empty(shape, dtype=dtype)
        return torch.cat(chunks, dim=2)

    def _score_rows(self, features, weights, biases, class_vectors) -> torch.Tensor:
        if self.kind == "backprop":
            logits = backprop_logits(
                features, weights, biases, self.activation, self.negative_slope
            )
            return logits.unsqueeze(1)

        scores = []
        inputs = l2_normalize(features) if self.normalize_input else features
        for weight, bias, vectors in zip(weights, biases, class_vectors, strict=True):
            _, output = layer_forward(inputs, weight, bias, self.activation, self.negative_slope)
            scores.append(class_scores(output, vectors))
            inputs = l2_normalize(output) if self.normalize_input else output
        return torch.stack(scores, dim=1)


def _init_spela_parameters(
    seeds: tuple[int, ...],
    widths: tuple[int, ...],
    num_features: int,
    num_classes: int,
    config: SpelaConfig,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Draw each head's class vectors and weights from its own seed; stack them per layer."""
    per_seed = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        layers = []
        in_width = num_features
        for width in widths:
            vectors = make_class_vectors(
                num_classes, width, config.class_vectors, generator, config.coulomb_steps
            )
            layers.append((vectors, kaiming_normal(width, in_width, generator)))
            in_width = width
        per_seed.append(layers)

    class_vectors = [torch.stack([head[k][0] for head in per_seed]) for k in range(len(widths))]
    weights = [torch.stack([head[k][1] for head in per_seed]) for k in range(len(widths))]
    biases = [torch.zeros(len(seeds), width) for width in widths]
    return class_vectors, weights, biases


def _spela_layer_gradients(
    inputs: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    class_vectors: torch.Tensor,
    labels: torch.Tensor,
    config: SpelaConfig,
) -> torch.Tensor:
    """Set the `.grad` of one layer's weight and bias from its local loss; return h [S, B, W]."""
    pre_activation, output = layer_forward(
        inputs,
        weight,
        bias,
        config.activation,
        config.negative_slope,
        keep_pre_activation=needs_pre_activation(config.activation),
    )
    targets = gather_targets(class_vectors, labels, output)

    if config.update == "closed_form":
        # The gradients are written into the same buffers on every step, never reallocated,
        # and the gathered targets serve as scratch space: the step allocates little.
        if weight.grad is None:
            weight.grad = torch.empty_like(weight, memory_format=torch.contiguous_format)
            bias.grad = torch.empty_like(bias, memory_format=torch.contiguous_format)
        closed_form_gradients(
            inputs,
            pre_activation,
            output,
            targets,
            config.loss,
            config.activation,
            config.negative_slope,
            out=(weight.grad, bias.grad),
            overwrite_targets=True,
        )
    else:
        weight_gradient, bias_gradient = autograd_gradients(
            inputs, weight, bias, targets, config.loss, config.activation, config.negative_slope
        )
        # Fused optimizers read a gradient's memory in the parameter's layout (seen with
        # torch 2.14 on the CPU), so a transposed gradient would update the wrong elements.
        weight.grad = weight_gradient.contiguous()
        bias.grad = bias_gradient.contiguous()

    return output


def fit_spela(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    config: SpelaConfig | None = None,
    seeds: Sequence[int] = (0,),
    device: str | torch.device = "cpu",
) -> FittedHeads:
    """Train one SPELA head per seed, all seeds together, each layer on its own local loss.

    Args:
        features: Training features [N, D], float.
        labels: Class indices [N] in 0..num_classes-1.
        num_classes: Class count C (at least 2).
        config: Head settings; None uses SpelaConfig().
        seeds: One head per seed; see the module docstring for what each seed sets.
        device: Torch device to train on.

    Returns:
        The fitted heads, exits `layer1` … `layerK`.

    Raises:
        ValueError: Invalid features, labels, class count, seeds or device, or more
            classes than the class-vector construction can serve.
    """
    config = SpelaConfig() if config is None else config
    check_training_inputs(features, labels, num_classes)
    seeds = check_seeds(seeds)
    device = check_device(device)
    widths = resolve_hidden_widths(config.hidden_widths, num_classes)

    class_vectors, weights, biases = _init_spela_parameters(
        seeds, widths, features.shape[1], num_classes, config
    )
    max_cosines = tuple(
        max(max_pairwise_cosine(layer_vectors[s]) for s in range(len(seeds)))
        for layer_vectors in class_vectors
    )
    for index, (width, cosine) in enumerate(zip(widths, max_cosines, strict=True)):
        if config.class_vectors != "symmetric" or num_classes <= width + 1:
            continue
        message = (
            f"layer{index + 1}: {num_classes} classes exceed width {width} + 1, Coulomb class "
            f"vectors reach a largest pairwise cosine of {cosine:.4f}"
        )
        if cosine > CROWDED_CLASS_COSINE:
            warnings.warn(
                f"{message}, so this layer can hardly tell some classes apart; widen it to at "
                f"least {num_classes - 1} in hidden_widths for a regular simplex",
                stacklevel=2,
            )
        else:
            logger.info("%s", message)

    class_vectors = [vectors.to(device) for vectors in class_vectors]
    weights = [weight.to(device).requires_grad_(True) for weight in weights]
    biases = [bias.to(device).requires_grad_(True) for bias in biases]
    if config.loop_order == "per_batch":
        # Adam and SGD act elementwise, and in this order every layer steps on every batch, so one
        # optimizer over all layers performs exactly the per-layer updates with less overhead.
        optimizers = [make_optimizer(weights + biases, config, device)]
    else:
        optimizers = [
            make_optimizer([weight, bias], config, device)
            for weight, bias in zip(weights, biases, strict=True)
        ]

    inputs = features.to(device, torch.float32)
    inputs = l2_normalize(inputs) if config.normalize_input else inputs
    labels = labels.to(device, torch.int64)
    generator = shuffle_generator(seeds)

    with torch.no_grad():
        if config.loop_order == "per_batch":
            _train_per_batch(
                inputs, labels, class_vectors, weights, biases, optimizers, config, generator
            )
        else:
            _train_layerwise(
                inputs, labels, class_vectors, weights, biases, optimizers, config, generator
            )

    return FittedHeads(
        kind="spela",
        seeds=seeds,
        exit_layers=tuple(f"layer{k + 1}" for k in range(len(widths))),
        weights=tuple(weight.detach() for weight in weights),
        biases=tuple(bias.detach() for bias in biases),
        class_vectors=tuple(class_vectors),
        max_class_cosine=max_cosines,
        num_features=features.shape[1],
        num_classes=num_classes,
        activation=config.activation,
        negative_slope=config.negative_slope,
        normalize_input=config.normalize_input,
    )


def _end_epoch(
    weights: Sequence[torch.Tensor],
    optimizers: Sequence[tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.StepLR | None]],
    config: SpelaConfig,
) -> None:
    """Advance the learning-rate schedules and, for the ablation, binarise the weights."""
    for _, schedule in optimizers:
        if schedule is not None:
            schedule.step()
    if config.binarize_weights:
        for weight in weights:
            weight.copy_(torch.sign(weight))


def spela_batch_step(
    inputs: torch.Tensor,
    labels: torch.Tensor,
    class_vectors: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    optimizers: Sequence[torch.optim.Optimizer],
    config: SpelaConfig,
) -> None:
    """Update every layer of S stacked SPELA heads on one batch, in place.

    Each layer's gradient comes from its own local loss, on the previous layer's
    output from before any update of this batch. Call it under `torch.no_grad()`.

    Args:
        inputs: Batch features [B, D], already L2-normalised when `config.normalize_input`.
        labels: Class indices [B].
        class_vectors: Per layer [S, C, W_k].
        weights: Per layer [S, W_k, W_{k-1}], leaf tensors that the optimizers update.
        biases: Per layer [S, W_k].
        optimizers: Optimizers that together cover every weight and bias, such as one
            per layer or one over all layers. Each steps once after all gradients are set.
        config: Loss, activation, normalisation and update rule.
    """
    layer_inputs = inputs
    for k in range(len(weights)):
        output = _spela_layer_gradients(
            layer_inputs, weights[k], biases[k], class_vectors[k], labels, config
        )
        layer_inputs = l2_normalize(output) if config.normalize_input else output

    for optimizer in optimizers:
        optimizer.step()


def _train_per_batch(
    inputs, labels, class_vectors, weights, biases, optimizers, config, generator
) -> None:
    """Update every layer on every batch, each layer fed the previous layer's output, detached."""
    step_optimizers = [optimizer for optimizer, _ in optimizers]
    for _ in range(config.epochs):
        for rows in batch_indices(inputs.shape[0], config.batch_size, config.shuffle, generator):
            rows = rows.to(inputs.device)
            spela_batch_step(
                inputs[rows], labels[rows], class_vectors, weights, biases, step_optimizers, config
            )
        _end_epoch(weights, optimizers, config)


def _train_layerwise(
    inputs, labels, class_vectors, weights, biases, optimizers, config, generator
) -> None:
    """Train layer k for all epochs on the outputs of the already trained layers 1..k-1."""
    for k in range(len(weights)):
        optimizer = optimizers[k][0]
        for _ in range(config.epochs):
            for rows in batch_indices(
                inputs.shape[0], config.batch_size, config.shuffle, generator
            ):
                rows = rows.to(inputs.device)
                layer_inputs = inputs[rows]
                for j in range(k):
                    _, output = layer_forward(
                        layer_inputs,
                        weights[j],
                        biases[j],
                        config.activation,
                        config.negative_slope,
                        keep_pre_activation=False,
                    )
                    layer_inputs = l2_normalize(output) if config.normalize_input else output
                _spela_layer_gradients(
                    layer_inputs, weights[k], biases[k], class_vectors[k], labels[rows], config
                )
                optimizer.step()
            _end_epoch([weights[k]], [optimizers[k]], config)


def backprop_batch_step(
    inputs: torch.Tensor,
    labels: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    config: BackpropConfig,
) -> None:
    """Update S stacked backprop heads on one batch, in place, by one optimizer step.

    Args:
        inputs: Batch features [B, D].
        labels: Class indices [B].
        weights: Per layer [S, D_out, D_in], leaf tensors that require grad; the last
            layer gives the logits.
        biases: Per layer [S, D_out].
        optimizer: One optimizer over all weights and biases.
        config: Activation settings.
    """
    logits = backprop_logits(
        inputs, list(weights), list(biases), config.activation, config.negative_slope
    )
    loss = backprop_loss(logits, labels).sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def fit_backprop(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    config: BackpropConfig | None = None,
    seeds: Sequence[int] = (0,),
    device: str | torch.device = "cpu",
) -> FittedHeads:
    """Train one backprop MLP head per seed, all seeds together, with softmax cross-entropy.

    Seeds set init and batch order as for `fit_spela`. Hidden and output weights
    are Kaiming-normal, biases zero.

    Args:
        features: Training features [N, D], float.
        labels: Class indices [N] in 0..num_classes-1.
        num_classes: Class count C (at least 2).
        config: Head settings; None uses BackpropConfig().
        seeds: One head per seed.
        device: Torch device to train on.

    Returns:
        The fitted heads, one exit `output` whose scores are the logits.

    Raises:
        ValueError: Invalid features, labels, class count, seeds or device.
    """
    config = BackpropConfig() if config is None else config
    check_training_inputs(features, labels, num_classes)
    seeds = check_seeds(seeds)
    device = check_device(device)
    widths = resolve_hidden_widths(config.hidden_widths, num_classes) + (num_classes,)

    per_seed = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        in_widths = (features.shape[1],) + widths[:-1]
        per_seed.append(
            [
                kaiming_normal(out, inp, generator)
                for out, inp in zip(widths, in_widths, strict=True)
            ]
        )
    weights = [
        torch.stack([head[k] for head in per_seed]).to(device).requires_grad_(True)
        for k in range(len(widths))
    ]
    biases = [torch.zeros(len(seeds), width, device=device, requires_grad=True) for width in widths]
    optimizer, schedule = make_optimizer(weights + biases, config, device)

    inputs = features.to(device, torch.float32)
    labels = labels.to(device, torch.int64)
    generator = shuffle_generator(seeds)

    for _ in range(config.epochs):
        for rows in batch_indices(inputs.shape[0], config.batch_size, config.shuffle, generator):
            rows = rows.to(device)
            backprop_batch_step(inputs[rows], labels[rows], weights, biases, optimizer, config)
        if schedule is not None:
            schedule.step()

    return FittedHeads(
        kind="backprop",
        seeds=seeds,
        exit_layers=("output",),
        weights=tuple(weight.detach() for weight in weights),
        biases=tuple(bias.detach() for bias in biases),
        class_vectors=(),
        max_class_cosine=(),
        num_features=features.shape[1],
        num_classes=num_classes,
        activation=config.activation,
        negative_slope=config.negative_slope,
        normalize_input=False,
    )
