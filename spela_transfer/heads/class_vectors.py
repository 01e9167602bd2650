"""Fixed class vectors ("neural priors") of the SPELA layers: one unit vector per class.

Each layer owns `num_classes` unit vectors of its own width. They are placed as far
apart as the sphere allows, which is what minimising the Coulomb (1/r) energy of
equal charges gives: a regular simplex when it fits, a numerical minimum otherwise.
"""

from __future__ import annotations

import torch

# The Coulomb minimisation keeps a few [C, C] float64 matrices in memory.
MAX_COULOMB_CLASSES = 4096

# Above this largest pairwise cosine two classes are too close for cosine scores to tell apart.
MAX_USABLE_COSINE = 0.999


def simplex_class_vectors(num_classes: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """Build a regular simplex of unit vectors, rotated at random.

    Every pairwise cosine equals `-1 / (num_classes - 1)`.

    Args:
        num_classes: Vertex count C, at least 2 and at most `width + 1`.
        width: Dimension of the vectors.
        generator: Source of the random rotation (a CPU generator).

    Returns:
        Unit vectors [C, width], float32.

    Raises:
        ValueError: `num_classes` is below 2 or above `width + 1`.
    """
    if num_classes < 2 or num_classes > width + 1:
        raise ValueError(
            f"a regular simplex of {num_classes} unit vectors needs 2 <= num_classes <= width + 1, "
            f"got width {width}; use coulomb_class_vectors for more classes"
        )

    # The centred standard basis of R^C is a regular simplex inside a (C-1)-dimensional subspace.
    centred = torch.eye(num_classes, dtype=torch.float64) - 1.0 / num_classes
    basis, _ = torch.linalg.qr(centred[:, : num_classes - 1])
    coordinates = centred @ basis
    coordinates = coordinates / coordinates.norm(dim=1, keepdim=True)

    # A random orthonormal frame of R^width, with signs fixed so that it is uniformly distributed.
    gaussian = torch.randn(width, num_classes - 1, generator=generator, dtype=torch.float64)
    frame, upper = torch.linalg.qr(gaussian)
    frame = frame * torch.sign(torch.diagonal(upper)).where(torch.diagonal(upper) != 0, 1.0)

    return (coordinates @ frame.T).to(torch.float32)


def coulomb_class_vectors(
    num_classes: int, width: int, generator: torch.Generator, steps: int = 500
) -> torch.Tensor:
    """Spread unit vectors on the sphere by projected gradient descent on their Coulomb energy.

    Starts from normalised Gaussian vectors; each step moves every vector against the
    energy gradient and projects it back onto the sphere. The result is a local
    minimum: check it with `max_pairwise_cosine`.

    Args:
        num_classes: Vector count C, at least 2 and at most MAX_COULOMB_CLASSES.
        width: Dimension of the vectors.
        generator: Source of the starting vectors (a CPU generator).
        steps: Gradient steps.

    Returns:
        Unit vectors [C, width], float32.

    Raises:
        ValueError: The class count is outside what the construction can serve.
    """
    if num_classes < 2 or num_classes > MAX_COULOMB_CLASSES:
        raise ValueError(
            f"the Coulomb class-vector construction serves 2 to {MAX_COULOMB_CLASSES} classes, "
            f"got num_classes={num_classes}; use fewer classes or class_vectors='gaussian'"
        )
    if width == 1 and num_classes > 2:
        raise ValueError(
            f"a layer of width 1 can hold at most 2 distinct class vectors, got "
            f"num_classes={num_classes}; widen the layers in hidden_widths"
        )

    vectors = torch.randn(num_classes, width, generator=generator, dtype=torch.float64)
    vectors = vectors / vectors.norm(dim=1, keepdim=True)
    not_self = ~torch.eye(num_classes, dtype=torch.bool)
    step_size = 0.1

    for _ in range(steps):
        # |v_i - v_j|^2 = 2 - 2 v_i.v_j for unit vectors, so the Gram matrix gives every distance.
        gram = vectors @ vectors.T
        distances = (2.0 - 2.0 * gram).clamp_min(1e-12).sqrt()
        weights = (distances**-3).where(not_self, 0.0)
        # The force on each charge, -dE/dv_i = sum_j w_ij (v_i - v_j), pushes it from the others.
        force = weights.sum(dim=1, keepdim=True) * vectors - weights @ vectors
        tangent = force - (force * vectors).sum(dim=1, keepdim=True) * vectors
        scale = tangent.norm(dim=1).max().clamp_min(1e-12)
        vectors = vectors + step_size * tangent / scale
        vectors = vectors / vectors.norm(dim=1, keepdim=True)
        step_size = max(step_size * 0.99, 1e-3)

    return vectors.to(torch.float32)


def gaussian_class_vectors(
    num_classes: int, width: int, generator: torch.Generator
) -> torch.Tensor:
    """Draw normalised Gaussian class vectors [C, width], the ablation with no spreading."""
    vectors = torch.randn(num_classes, width, generator=generator, dtype=torch.float64)
    return (vectors / vectors.norm(dim=1, keepdim=True)).to(torch.float32)


def max_pairwise_cosine(vectors: torch.Tensor) -> float:
    """Return the largest cosine between two distinct rows of `vectors` [C, width]."""
    unit = vectors.double() / vectors.double().norm(dim=1, keepdim=True)
    cosines = unit @ unit.T
    cosines.fill_diagonal_(-2.0)
    return float(cosines.max())


def make_class_vectors(
    num_classes: int,
    width: int,
    method: str,
    generator: torch.Generator,
    coulomb_steps: int = 500,
) -> torch.Tensor:
    """Build one layer's class vectors [C, width] with the named method.

    `symmetric` gives a regular simplex when `num_classes <= width + 1` and a
    Coulomb-energy minimum otherwise; `gaussian` gives normalised Gaussian vectors.

    Raises:
        ValueError: Unknown method, or a class count the construction cannot serve,
            including one whose closest two vectors reach a cosine of MAX_USABLE_COSINE.
    """
    if method == "gaussian":
        return gaussian_class_vectors(num_classes, width, generator)
    if method != "symmetric":
        raise ValueError(f"class vector method must be 'symmetric' or 'gaussian', got {method!r}")
    if num_classes <= width + 1:
        return simplex_class_vectors(num_classes, width, generator)

    vectors = coulomb_class_vectors(num_classes, width, generator, steps=coulomb_steps)
    largest = max_pairwise_cosine(vectors)
    if largest >= MAX_USABLE_COSINE:
        raise ValueError(
            f"{num_classes} class vectors in width {width} end up with a pairwise cosine of "
            f"{largest:.4f}, too close to tell classes apart; widen the layers in hidden_widths"
        )
    return vectors
