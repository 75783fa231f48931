"""scikit-learn's 8x8 digits as Bernoulli probabilities (:func:`load_digits`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Digits:
    """Train intensities in [0, 1] (binarized per epoch) and fixed binarized test images."""

    train: torch.Tensor  # (N_train, 64) probabilities v / 16
    test: torch.Tensor  # (N_test, 64) 0/1

    def binarized_train(self, generator: torch.Generator) -> torch.Tensor:
        return torch.bernoulli(self.train, generator=generator)


def load_digits(num_test: int = 300, num_train: int | None = None, seed: int = 0) -> Digits:
    """scikit-learn's digits, split at random (``seed``) into train and test images."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the VAE example needs scikit-learn for its data: pip install 'pyro_elbo[examples]'"
        ) from error
    images = torch.as_tensor(sklearn_digits().data, dtype=torch.get_default_dtype()) / 16.0
    total = images.shape[0]
    if not 0 < num_test < total:
        raise ValueError(f"num_test must be between 1 and {total - 1}, got {num_test}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(total, generator=generator)
    test, train = images[order[:num_test]], images[order[num_test:]]
    if num_train is not None:
        if not 0 < num_train <= train.shape[0]:
            raise ValueError(f"num_train must be between 1 and {train.shape[0]}, got {num_train}")
        train = train[:num_train]
    return Digits(train=train, test=torch.bernoulli(test, generator=generator))
