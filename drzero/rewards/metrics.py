"""Training metrics from the rewards' extra info, which verl 0.7.1 logs only for validation.

verl's reward loop keeps every key a reward function returns besides ``score`` as a per-sample
column of the batch (``non_tensor_batch``), dumps it with the rollouts, and averages it into
``val-aux/…`` metrics during validation; the training step logs none of it. These are the keys
that say whether training trains what it should, logged per step as ``drzero/<key>/mean``:

    budget_cut         share of trajectories the response budget ended (no answer possible)
    probe_budget_cut   proposer: share of completed solver probes the budget ended
    probe_errors       proposer: solver probes lost to server or retriever failures, per sample
    probes_incomplete  proposer: share of samples with < 2 completed probes (format reward only)
    n, k               proposer: completed probes and correct ones, per sample
    format, difficulty, think, answered

``install_training_metrics()`` wraps ``ray_trainer.compute_data_metrics`` inside the TaskRunner
actor (``drzero.verl.hrpo.HRPOTaskRunner``), the process that runs ``fit()``, which looks the
function up by name when it logs a step.
"""

from __future__ import annotations

import functools

import numpy as np

TRAINING_METRIC_KEYS = ("budget_cut", "probe_budget_cut", "probe_errors", "probes_incomplete", "n", "k", "format",
                        "difficulty", "think", "answered")
PREFIX = "drzero"
MARKER = "__drzero_metrics__"


def reward_extra_metrics(non_tensor_batch: dict) -> dict[str, float]:
    """``drzero/<key>/mean`` for every known reward key present in the batch with numeric values."""
    metrics = {}
    for key in TRAINING_METRIC_KEYS:
        values = non_tensor_batch.get(key)
        if values is None:
            continue
        try:
            numbers = np.asarray(values, dtype=float)
        except (TypeError, ValueError):
            continue
        if numbers.size:
            metrics[f"{PREFIX}/{key}/mean"] = float(np.nanmean(numbers))
    return metrics


def with_reward_metrics(original):
    @functools.wraps(original)
    def compute_data_metrics(batch, *args, **kwargs):
        metrics = original(batch, *args, **kwargs)
        metrics.update(reward_extra_metrics(batch.non_tensor_batch))
        return metrics

    setattr(compute_data_metrics, MARKER, True)
    return compute_data_metrics


def install_training_metrics() -> None:
    """Patch ``verl.trainer.ppo.ray_trainer.compute_data_metrics`` in this process; idempotent."""
    from verl.trainer.ppo import ray_trainer  # verl: only a training process has it, and it is slow to import

    if not getattr(ray_trainer.compute_data_metrics, MARKER, False):
        ray_trainer.compute_data_metrics = with_reward_metrics(ray_trainer.compute_data_metrics)
