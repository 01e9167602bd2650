"""Class vectors of the SPELA layers: simplex, Coulomb minimum, Gaussian ablation."""

import pytest
import torch

from spela_transfer.heads.class_vectors import (
    MAX_COULOMB_CLASSES,
    coulomb_class_vectors,
    gaussian_class_vectors,
    make_class_vectors,
    max_pairwise_cosine,
    simplex_class_vectors,
)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(("num_classes", "width"), [(2, 1), (3, 2), (10, 64), (10, 9), (65, 64)])
def test_simplex_pairwise_cosines(num_classes, width):
    vectors = simplex_class_vectors(num_classes, width, _generator(0)).double()
    cosines = vectors @ vectors.T

    assert vectors.shape == (num_classes, width)
    torch.testing.assert_close(cosines.diagonal(), torch.ones(num_classes, dtype=torch.float64))
    off_diagonal = cosines[~torch.eye(num_classes, dtype=torch.bool)]
    expected = torch.full_like(off_diagonal, -1.0 / (num_classes - 1))
    torch.testing.assert_close(off_diagonal, expected, atol=1e-6, rtol=0)


def test_simplex_same_seed_same_vectors():
    first = simplex_class_vectors(10, 64, _generator(3))
    again = simplex_class_vectors(10, 64, _generator(3))
    other = simplex_class_vectors(10, 64, _generator(4))

    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_simplex_rotation_spans_all_axes():
    # Without a rotation the vertices would lie in the first num_classes coordinates only.
    vectors = simplex_class_vectors(3, 64, _generator(0))

    assert vectors[:, 3:].abs().sum() > 0.1


def test_coulomb_spreads_better_than_gaussian():
    spread = coulomb_class_vectors(100, 16, _generator(0))
    random = gaussian_class_vectors(100, 16, _generator(0))

    torch.testing.assert_close(spread.norm(dim=1), torch.ones(100))
    assert max_pairwise_cosine(spread) < 0.4
    assert max_pairwise_cosine(random) > 0.6


def test_coulomb_reaches_known_optimum_on_circle():
    # Six charges on a circle settle into a regular hexagon: neighbours at 60 degrees.
    vectors = coulomb_class_vectors(6, 2, _generator(1), steps=2000)

    assert max_pairwise_cosine(vectors) == pytest.approx(0.5, abs=1e-3)


def test_coulomb_same_seed_same_vectors():
    assert torch.equal(
        coulomb_class_vectors(20, 4, _generator(2), steps=50),
        coulomb_class_vectors(20, 4, _generator(2), steps=50),
    )


def test_make_class_vectors_picks_construction():
    simplex = make_class_vectors(5, 4, "symmetric", _generator(0))
    coulomb = make_class_vectors(6, 4, "symmetric", _generator(0), coulomb_steps=50)
    gaussian = make_class_vectors(6, 4, "gaussian", _generator(0))

    assert max_pairwise_cosine(simplex) == pytest.approx(-0.25, abs=1e-6)
    assert coulomb.shape == (6, 4)
    torch.testing.assert_close(gaussian.norm(dim=1), torch.ones(6))


def test_simplex_rejects_too_many_classes():
    with pytest.raises(ValueError, match=r"needs 2 <= num_classes <= width \+ 1, got width 4"):
        simplex_class_vectors(6, 4, _generator(0))


def test_coulomb_rejects_width_one():
    with pytest.raises(ValueError, match="width 1 can hold at most 2 .* num_classes=3"):
        coulomb_class_vectors(3, 1, _generator(0))


def test_coulomb_rejects_too_many_classes():
    with pytest.raises(ValueError, match=f"serves 2 to {MAX_COULOMB_CLASSES} classes"):
        coulomb_class_vectors(MAX_COULOMB_CLASSES + 1, 8, _generator(0))


def test_make_class_vectors_rejects_crowded_sphere():
    # 200 points on a circle are at most 1.8 degrees apart, a cosine above 0.999.
    with pytest.raises(ValueError, match="200 class vectors in width 2 .* widen the layers"):
        make_class_vectors(200, 2, "symmetric", _generator(0), coulomb_steps=5)


def test_make_class_vectors_rejects_unknown_method():
    with pytest.raises(ValueError, match="'symmetric' or 'gaussian', got 'simplex'"):
        make_class_vectors(3, 4, "simplex", _generator(0))
