"""A control for learning experiments: GRPO on rewards permuted across the batch.

    algorithm.adv_estimator=grpo_shuffled_rewards       # a verl override; registered next to HRPO

``benchmarks/learning_curve.py`` runs it beside the real curve, same seed and data: every trajectory's
outcome score is replaced by the score of another trajectory of the same batch (a permutation, so the
batch keeps the same multiset of rewards and the same mean), then verl's own GRPO arithmetic runs on the
permuted scores. The reward no longer says anything about the trajectory it is credited to, so a policy
that learns from the reward must stay flat, while everything else (rollouts, search, loss mask, optimizer,
learning rate) stays the same.

Why an advantage estimator and not a reward function: in verl 0.7.1 the reward is computed one trajectory
at a time inside the agent loop's reward workers (``RewardLoopWorker.compute_score`` asserts a single item),
as each trajectory finishes; no reward plug-in sees the batch. The first place that does is the advantage
estimator registry (``core_algos.register_adv_est``), which gets the whole batch's ``token_level_rewards``.
The logged ``critic/score/mean`` stays the true reward: the permutation reaches only the advantages.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

SHUFFLED_GRPO = "grpo_shuffled_rewards"
SHUFFLE_SEED = 1234      # fixed: the control is the same permutation sequence in every run
MARKER = "__drzero_control__"
_calls = itertools.count()


def norm_by_std(norm_adv_by_std_in_grpo: bool | None, config: Any) -> bool:
    """GRPO's std switch: the explicit argument wins; else ``config.norm_adv_by_std_in_grpo`` (verl's default:
    True). verl's registry path passes only ``config`` to a registered estimator."""
    if norm_adv_by_std_in_grpo is not None:
        return bool(norm_adv_by_std_in_grpo)
    if config is not None:
        return bool(config.get("norm_adv_by_std_in_grpo", True))
    return True


def permuted(scores, rng: np.random.Generator):
    """``scores`` (a 1-D tensor or array) reordered by a random permutation drawn from ``rng``."""
    order = rng.permutation(len(scores))
    return scores[order.tolist()] if hasattr(scores, "new_tensor") else np.asarray(scores)[order]


def compute_shuffled_grpo_advantage(token_level_rewards, response_mask, index=None, config=None,
                                    norm_adv_by_std_in_grpo: bool | None = None, **_unused):
    """verl's GRPO advantages over ``index`` (the prompt uids), computed on outcome scores permuted across
    the batch. Each call draws the next permutation of a fixed-seed sequence."""
    import torch
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    if index is None:
        raise ValueError(f"the {SHUFFLED_GRPO!r} estimator needs the GRPO group index (verl passes the uids)")
    rng = np.random.default_rng([SHUFFLE_SEED, next(_calls)])
    scores = token_level_rewards.sum(dim=-1)
    shuffled = torch.zeros_like(token_level_rewards)
    shuffled[:, 0] = permuted(scores, rng)      # GRPO reads only the sum over tokens
    return compute_grpo_outcome_advantage(token_level_rewards=shuffled, response_mask=response_mask,
                                          index=np.asarray(index, dtype=object),
                                          norm_adv_by_std_in_grpo=norm_by_std(norm_adv_by_std_in_grpo, config))


setattr(compute_shuffled_grpo_advantage, MARKER, True)


def register_controls() -> None:
    """Register ``grpo_shuffled_rewards`` with verl's advantage-estimator registry; idempotent."""
    from verl.trainer.ppo import core_algos

    existing = core_algos.ADV_ESTIMATOR_REGISTRY.get(SHUFFLED_GRPO)
    if existing is not None and not getattr(existing, MARKER, False):
        raise ValueError(f"advantage estimator {SHUFFLED_GRPO!r} is already registered by {existing!r}, not by drzero")
    if existing is None:
        core_algos.register_adv_est(SHUFFLED_GRPO)(compute_shuffled_grpo_advantage)
