"""DiffusionNFT, as its authors implement it (NVlabs/DiffusionNFT ``train_nft_sd3.py``), for
ScardNFT post-training (seed §B.5, notes/diffusion-stack.md §4).

Flow matching conventions (DESIGN §4): ``x_t = (1 - s) x0 + s e``, velocity ``v = e - x0``,
``x0 = x_t - s v``. With the trained policy's velocity ``v_theta``, the old (rollout) policy's
``v_old`` and the frozen base's ``v_ref``:

* implicit positive policy ``v+ = beta v_theta + (1 - beta) v_old``,
  implicit negative policy ``v- = (1 + beta) v_old - beta v_theta``;
* ``x0± = x_t - s v±``; per-sample adaptive weights ``w± = mean|x0± - x0|`` (detached,
  clamped >= 1e-5); ``L± = mean((x0± - x0)^2 / w±)``;
* ``r = clamp(clamp(A, ±C) / C / 2 + 0.5, 0, 1)`` from the group-normalised advantage ``A``;
* ``loss = mean((r L+ + (1 - r) L-) / beta) * C + kl_weight * mean((v_theta - v_ref)^2)``.

The old policy is a soft (EMA) copy of the trainable parameters, updated after each step with
the decay schedules of the reference code.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """``(R - mean of its group) / (std of all rewards + eps)`` for rewards ``[groups, K]``.

    As the reference code's ``PerPromptStatTracker(global_std=True)``: the mean is per case
    (its K rollouts), the standard deviation (population) over the whole batch.
    """
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [groups, K>=2], got {tuple(rewards.shape)}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return centred / (rewards.std(unbiased=False) + eps)


def advantage_weight(adv: torch.Tensor, clip: float) -> torch.Tensor:
    """``r`` in [0, 1]: 1 = fully positive sample, 0 = fully negative, 0.5 = neutral."""
    return (adv.clamp(-clip, clip) / clip / 2 + 0.5).clamp(0.0, 1.0)


def nft_loss(v_theta: torch.Tensor, v_old: torch.Tensor, v_ref: torch.Tensor,
             x_t: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, r: torch.Tensor,
             beta: float, kl_weight: float, adv_clip_max: float
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """The DiffusionNFT loss (module docstring). Tensors ``[N, ...]``; ``sigma``, ``r``: ``[N]``."""
    dims = tuple(range(1, x0.ndim))
    s = sigma.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    v_pos = beta * v_theta + (1 - beta) * v_old
    v_neg = (1 + beta) * v_old - beta * v_theta
    x0_pos, x0_neg = x_t - s * v_pos, x_t - s * v_neg
    with torch.no_grad():
        w_pos = (x0_pos.double() - x0.double()).abs().mean(dims, keepdim=True).clamp_min(1e-5)
        w_neg = (x0_neg.double() - x0.double()).abs().mean(dims, keepdim=True).clamp_min(1e-5)
    l_pos = ((x0_pos - x0) ** 2 / w_pos).mean(dims)
    l_neg = ((x0_neg - x0) ** 2 / w_neg).mean(dims)
    policy = ((r * l_pos + (1 - r) * l_neg) / beta * adv_clip_max).mean()
    kl = ((v_theta - v_ref) ** 2).mean(dims).mean()
    loss = policy + kl_weight * kl
    return loss.float(), {"policy_loss": policy.item(), "kl": kl.item()}


def old_policy_decay(step: int, decay_type: int) -> float:
    """Decay of the old-policy soft update after ``step`` steps (reference code's types)."""
    if decay_type == 0:
        return 0.0
    if decay_type == 1:
        return min(0.001 * step, 0.5)
    if decay_type == 2:
        return 0.0 if step < 75 else min(0.0075 * (step - 75), 0.999)
    raise ValueError(f"unknown decay type {decay_type}")


class PolicySnapshot:
    """A copy of some parameters that can be swapped in for a forward pass (the old policy).

    ``with snap.swapped(): ...`` runs with the snapshot's values in the live parameters and
    restores them afterwards (pointer swaps, no copies); ``soft_update(decay)`` moves the
    snapshot towards the live values: ``old <- decay old + (1 - decay) live``.
    """

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = list(params)
        self.values = [p.detach().clone() for p in self.params]

    @contextmanager
    def swapped(self):
        with torch.no_grad():
            for p, v in zip(self.params, self.values):
                p.data, v.data = v.data, p.data
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.params, self.values):
                    p.data, v.data = v.data, p.data

    @torch.no_grad()
    def soft_update(self, decay: float) -> None:
        for p, v in zip(self.params, self.values):
            v.mul_(decay).add_(p.detach(), alpha=1.0 - decay)

    def state(self) -> dict[str, torch.Tensor]:
        return {f"old_policy.{i}": v for i, v in enumerate(self.values)}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        if len(state) != len(self.values):
            raise ValueError(f"old-policy state has {len(state)} tensors, expected "
                             f"{len(self.values)}")
        for i, v in enumerate(self.values):
            v.copy_(state[f"old_policy.{i}"])

