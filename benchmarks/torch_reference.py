"""The authors' λ solver in PyTorch, as MAP.md section 2 describes it: the counterpart the benchmarks time.

One palette at a time, as their code runs: λ = exp(τ), τ = 0 at start, torch Adam (lr 0.1, default betas
and eps), exactly 150 steps, float32, loss = log(mean(exp(λᵀr))) − λᵀc with a plain exp; a non-finite λ at
the top of a step is a failure; the λ returned is the one from the top of the last step.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def reference_lambda(rewards: torch.Tensor, target: torch.Tensor, steps: int = 150) -> tuple[list[float], bool]:
    """rewards [values, n] float32, target [values] float32 -> (λ, success)."""
    lam = torch.zeros_like(target)
    lam[:] = 1.0
    tau = torch.zeros_like(target, requires_grad=True)
    optimizer = torch.optim.Adam([tau], lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        lam = torch.exp(tau)
        loss = torch.log(torch.mean(torch.exp(torch.sum(lam[:, None] * rewards, dim=0)))) - torch.dot(lam, target)
        if torch.any(torch.isnan(lam)) or torch.any(torch.isinf(lam)):
            return [math.nan] * len(target), False
        loss.backward()
        optimizer.step()
    return lam.detach().tolist(), True


def reference_lambdas(rewards: np.ndarray, targets: np.ndarray, steps: int = 150) -> tuple[np.ndarray, np.ndarray]:
    """rewards [n, values], targets [palettes, values] -> (λ [palettes, values], success [palettes])."""
    # A contiguous [values, n] tensor, as a model's scores stacked by value would be: torch then sums λᵀr over the
    # values in their order (a transposed view would reorder that sum, and float32 rounding with it).
    torch_rewards = torch.tensor(np.ascontiguousarray(rewards.T), dtype=torch.float32)
    lams, successes = [], []
    for target in targets:
        lam, success = reference_lambda(torch_rewards, torch.tensor(target, dtype=torch.float32), steps)
        lams.append(lam)
        successes.append(success)
    return np.asarray(lams), np.asarray(successes)
