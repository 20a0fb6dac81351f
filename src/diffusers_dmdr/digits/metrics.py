"""Sample-quality metrics on evaluation-classifier features: accuracy, Frechet distance, precision/recall, diversity.

All functions take tensors and return Python floats; features are computed in float64. The features come from
[`EvalDigitNet`], which is trained on its own split and never used for training, so these numbers cannot be gamed
through the reward.

- Frechet distance (FD): the FID formula of Heusel et al. (https://huggingface.co/papers/1706.08500) on
  evaluation-classifier features instead of Inception features.
- Precision and recall with k-nearest-neighbour manifolds (Kynkaanniemi et al.,
  https://huggingface.co/papers/1904.06991).
- Diversity: the mean pairwise Euclidean feature distance among samples of the same prompt, averaged over prompts.
"""

from collections import defaultdict
from collections.abc import Sequence

import torch

from .classifiers import EvalDigitNet, extract_features, predict_digits
from .pairs import split_halves


def feature_moments(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of shape `(D,)` and unbiased covariance of shape `(D, D)` of `features` of shape `(N, D)`, float64."""
    features = features.double()
    return features.mean(dim=0), torch.cov(features.T).reshape(features.shape[1], features.shape[1])


def frechet_distance_from_moments(
    mean_a: torch.Tensor, covariance_a: torch.Tensor, mean_b: torch.Tensor, covariance_b: torch.Tensor
) -> float:
    """Frechet (2-Wasserstein) distance between the Gaussians `N(mean_a, covariance_a)` and `N(mean_b, covariance_b)`.

    `|mean_a - mean_b|^2 + tr(covariance_a) + tr(covariance_b) - 2 tr((covariance_a covariance_b)^(1/2))`. The trace
    of the matrix square root is computed as the sum of the square roots of the eigenvalues of the symmetric
    positive semi-definite `A^(1/2) B A^(1/2)` (same eigenvalues as `A B`), which is stable without the
    complex-valued `sqrtm` fix-ups of the reference FID code.
    """
    mean_a, mean_b = mean_a.double(), mean_b.double()
    covariance_a, covariance_b = covariance_a.double(), covariance_b.double()
    eigenvalues_a, eigenvectors_a = torch.linalg.eigh(covariance_a)
    sqrt_a = eigenvectors_a @ torch.diag(eigenvalues_a.clamp(min=0).sqrt()) @ eigenvectors_a.T
    middle = sqrt_a @ covariance_b @ sqrt_a
    trace_sqrt_product = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mean_a - mean_b).pow(2).sum() + covariance_a.trace() + covariance_b.trace() - 2 * trace_sqrt_product
    return float(distance.clamp(min=0))


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets of shapes `(N_a, D)` and `(N_b, D)`."""
    return frechet_distance_from_moments(*feature_moments(features_a), *feature_moments(features_b))


def _kth_neighbour_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    distances = torch.cdist(features, features)
    # Index 0 of each sorted row is the point itself (distance 0).
    return distances.sort(dim=1).values[:, k]


def knn_precision_recall(real_features: torch.Tensor, fake_features: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall of generated samples (Kynkaanniemi et al., 2019).

    Each set's manifold is the union of balls around its points with radius the distance to the point's `k`-th
    nearest neighbour in the same set. Precision is the fraction of generated samples inside the real manifold;
    recall is the fraction of real samples inside the generated manifold.

    Args:
        real_features (`torch.Tensor`): shape `(N_real, D)`.
        fake_features (`torch.Tensor`): shape `(N_fake, D)`.
        k (`int`, *optional*, defaults to 3): the neighbourhood size (the paper's default).

    Returns:
        `tuple[float, float]`: `(precision, recall)`, each in [0, 1].
    """
    real_features, fake_features = real_features.double(), fake_features.double()
    if min(len(real_features), len(fake_features)) <= k:
        raise ValueError(f"Both sets need more than k={k} samples for k-NN manifolds.")
    real_radii = _kth_neighbour_radii(real_features, k)
    fake_radii = _kth_neighbour_radii(fake_features, k)
    fake_to_real = torch.cdist(fake_features, real_features)
    precision = (fake_to_real <= real_radii[None, :]).any(dim=1).double().mean()
    recall = (fake_to_real.T <= fake_radii[None, :]).any(dim=1).double().mean()
    return float(precision), float(recall)


def mean_pairwise_distance(features: torch.Tensor) -> float:
    """Mean Euclidean distance over all pairs `i < j` of `features` of shape `(N, D)`, `N >= 2`."""
    features = features.double()
    if len(features) < 2:
        raise ValueError("Diversity needs at least two samples.")
    distances = torch.cdist(features, features)
    return float(distances.sum() / (len(features) * (len(features) - 1)))


def per_prompt_diversity(features: torch.Tensor, prompts: Sequence[str]) -> float:
    """`mean_pairwise_distance` within each prompt's samples, averaged over prompts with at least two samples."""
    groups = defaultdict(list)
    for index, prompt in enumerate(prompts):
        groups[prompt].append(index)
    values = [mean_pairwise_distance(features[index]) for index in groups.values() if len(index) >= 2]
    if not values:
        raise ValueError("Per-prompt diversity needs at least two samples of some prompt.")
    return sum(values) / len(values)


@torch.no_grad()
def pair_features(eval_classifier: EvalDigitNet, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Features `(N, 2 * feature_dim)` (float64) of pair images `(N, 3, H, 2H)`: the left half's, then the right's."""
    left, right = split_halves(images)
    return torch.cat(
        [extract_features(eval_classifier, left, batch_size), extract_features(eval_classifier, right, batch_size)],
        dim=1,
    )


@torch.no_grad()
def predict_pairs(classifier, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """`(left, right)` argmax digits, int64 `(N, 2)`, of pair images `(N, 3, H, 2H)` under a single-digit classifier."""
    left, right = split_halves(images)
    return torch.stack(
        [predict_digits(classifier, left, batch_size), predict_digits(classifier, right, batch_size)], 1
    )


def evaluate_pairs(
    eval_classifier: EvalDigitNet,
    images: torch.Tensor,
    pairs: torch.Tensor,
    prompts: Sequence[str],
    real_images: torch.Tensor,
    k: int = 3,
) -> dict[str, float]:
    """Every testbed metric of generated digit pairs against held-out real pairs.

    The evaluation classifier reads each 32 x 32 half on its own. Features for FD, precision, recall and diversity
    are the two halves' features side by side (so a pair whose halves are swapped is a different point).

    Args:
        eval_classifier ([`EvalDigitNet`]): the evaluation classifier.
        images (`torch.Tensor`): generated pair images `(N, 3, 32, 64)` in [0, 1].
        pairs (`torch.Tensor`): the prompted `(left, right)` digits, int64 `(N, 2)`.
        prompts (`Sequence[str]`): the `N` prompts (groups for diversity).
        real_images (`torch.Tensor`): real pair images `(M, 3, 32, 64)` (built from the `real` split).
        k (`int`, *optional*, defaults to 3): neighbourhood size for precision and recall.

    Returns:
        `dict[str, float]`: `pair_accuracy` (both halves right), `left_accuracy`, `right_accuracy`, `accuracy`
        (mean of the two halves), `fd`, `precision`, `recall`, `diversity` (NaN when no prompt repeats).
    """
    predicted = predict_pairs(eval_classifier, images)
    correct = predicted == pairs
    fake_features = pair_features(eval_classifier, images)
    real_features = pair_features(eval_classifier, real_images)
    precision, recall = knn_precision_recall(real_features, fake_features, k=k)
    has_repeated_prompt = len(set(prompts)) < len(prompts)
    return {
        "pair_accuracy": float(correct.all(dim=1).double().mean()),
        "left_accuracy": float(correct[:, 0].double().mean()),
        "right_accuracy": float(correct[:, 1].double().mean()),
        "accuracy": float(correct.double().mean()),
        "fd": frechet_distance(real_features, fake_features),
        "precision": precision,
        "recall": recall,
        "diversity": per_prompt_diversity(fake_features, prompts) if has_repeated_prompt else float("nan"),
    }
