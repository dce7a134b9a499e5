"""HRPO for verl 0.7.1: GRPO advantages normalized within hop-count groups, not within prompts.

What HRPO is
    Dr. Zero trains the proposer with HRPO. Each prompt gets ONE rollout (``rollout.n = 1``); the
    outcome score of sample *i* with hop count *h* is normalized against every sample of the batch
    that has the same hop count:

        A_i = (r_i - mean_{j in I_h} r_j) / (std_{j in I_h} r_j + eps)      (std: unbiased, eps 1e-6)

    broadcast over the response tokens (zero elsewhere). The hop count travels as the verl
    ``data_source`` column (``search_zero_1`` ... ``search_zero_4``), so the group key is
    ``data.non_tensor_batch["data_source"]``. The arithmetic is exactly verl's GRPO
    (``core_algos.compute_grpo_outcome_advantage``); only the grouping differs.

Why registering an estimator is not enough
    verl 0.7.1's ``ray_trainer.compute_advantage`` hands a custom estimator (one registered with
    ``core_algos.register_adv_est``) only ``token_level_rewards``, ``response_mask``, ``config`` and
    ``index=data.non_tensor_batch["uid"]``. ``fit()`` gives every prompt a fresh uid, so with
    ``rollout.n = 1`` every group holds one sample, verl gives a singleton group mean 0 / std 1, and the
    "advantage" is the raw score: plain REINFORCE, with no error. The estimator cannot see
    ``data_source``.

How it is wired
    1. ``register_hrpo()`` registers ``hrpo`` (so ``algorithm.adv_estimator=hrpo`` resolves) as a thin
       call to verl's own GRPO function over whatever ``index`` it is given.
    2. ``install_hrpo_wrapper()`` replaces the module attribute
       ``verl.trainer.ppo.ray_trainer.compute_advantage`` with ``compute_advantage_by_hop(original)``:
       for ``hrpo`` it runs the estimator with ``index`` = the hop groups; every other estimator goes to
       the original unchanged. ``RayPPOTrainer.fit()`` looks ``compute_advantage`` up as a module global
       at call time, so it picks the wrapper up.
    3. The patch must live in the process that runs ``fit()``: the TaskRunner Ray actor. A patch made
       in the driver does not reach it. ``HRPOTaskRunner.run()`` therefore installs the wrapper inside
       the actor before handing over to verl's ``TaskRunner.run()``.

How it is launched
    Our entry module builds the verl config (Hydra) and calls ``run_ppo_with_hrpo(config)``, which is
    verl's ``run_ppo(config, task_runner_class=ray.remote(num_cpus=1)(HRPOTaskRunner))``. The solver
    (plain GRPO, n = 5) can go through the same call: the wrapper passes ``grpo`` through untouched.
    A preflight should call ``assert_estimator_resolves(config.algorithm.adv_estimator)``: verl itself
    only notices an unknown estimator at the first ``compute_advantage``, after the GPUs have started.
"""

from __future__ import annotations

import difflib
import functools
import json
import warnings
from typing import Callable

import numpy as np

from drzero.rewards.metrics import install_training_metrics
from drzero.verl.controls import norm_by_std, register_controls

HRPO = "hrpo"
HOP_GROUP_KEY = "data_source"   # the non-tensor column holding search_zero_<hops>
MARKER = "__drzero_hrpo__"      # set on our estimator and on our compute_advantage wrapper


def compute_hrpo_outcome_advantage(token_level_rewards, response_mask, index=None, epsilon: float | None = None,
                                   norm_adv_by_std_in_grpo: bool | None = None, config=None, **_unused):
    """GRPO outcome advantages over the groups in ``index``, masked by ``response_mask``.

    This is verl's ``compute_grpo_outcome_advantage`` (mean / unbiased std / eps 1e-6 / the
    ``norm_adv_by_std_in_grpo`` switch); HRPO is that math with ``index`` = hop groups, which only
    ``compute_advantage_by_hop`` supplies. verl's registry path calls this with ``index`` = uids and no
    ``norm_adv_by_std_in_grpo``, so that switch is read from ``config`` when not given. Extra keyword
    arguments verl may pass to registered estimators (``reward_baselines``) are ignored.
    """
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    if index is None:
        raise ValueError(f"the {HRPO!r} advantage estimator needs a group index (the hop groups); got none")
    index = np.asarray(index, dtype=object)
    if len(index) > 1 and len(set(index.tolist())) == len(index):
        # The signature of the silent failure: every group a singleton -> advantage == raw score.
        warnings.warn(f"{HRPO}: every advantage group has one sample, so advantages equal raw scores "
                      "(REINFORCE). Is install_hrpo_wrapper() active in the process that runs fit()?",
                      RuntimeWarning, stacklevel=2)
    kwargs = {} if epsilon is None else {"epsilon": epsilon}   # default: verl's own epsilon
    return compute_grpo_outcome_advantage(
        token_level_rewards=token_level_rewards, response_mask=response_mask, index=index,
        norm_adv_by_std_in_grpo=norm_by_std(norm_adv_by_std_in_grpo, config), config=config, **kwargs)


setattr(compute_hrpo_outcome_advantage, MARKER, True)


def register_hrpo() -> Callable:
    """Register ``hrpo`` with verl's advantage-estimator registry; idempotent. Returns the estimator.

    A registration of ours from an earlier import of this module (same marker) is kept; a foreign
    function under the same name is an error (verl's own decorator would raise too).
    """
    from verl.trainer.ppo import core_algos

    existing = core_algos.ADV_ESTIMATOR_REGISTRY.get(HRPO)
    if existing is not None:
        if getattr(existing, MARKER, False):
            return existing
        raise ValueError(f"advantage estimator {HRPO!r} is already registered by {existing!r}, not by drzero")
    core_algos.register_adv_est(HRPO)(compute_hrpo_outcome_advantage)
    return compute_hrpo_outcome_advantage


def hop_group_index(data) -> np.ndarray:
    """The HRPO group key of every sample of a ``DataProto``: its ``data_source`` (``search_zero_<hops>``)."""
    non_tensor = data.non_tensor_batch
    if HOP_GROUP_KEY not in non_tensor:
        raise KeyError(f"HRPO groups by non_tensor_batch[{HOP_GROUP_KEY!r}], which this batch lacks "
                       f"(has: {sorted(non_tensor)}); the proposer parquet must carry it")
    groups = np.asarray(non_tensor[HOP_GROUP_KEY], dtype=object)
    if len(groups) != len(data):
        raise ValueError(f"{HOP_GROUP_KEY} has {len(groups)} entries for a batch of {len(data)}")
    return groups


SUMMARY_PREFIX = "drzero-hrpo groups:"


def group_summary(groups, scores, sample_advantages) -> str:
    """``SUMMARY_PREFIX`` then JSON {group: {n, score_mean, advantage_mean}} for one batch."""
    out = {}
    for group in sorted(set(np.asarray(groups, dtype=object).tolist())):
        members = [i for i, g in enumerate(groups) if g == group]
        out[str(group)] = {"n": len(members),
                           "score_mean": round(float(sum(float(scores[i]) for i in members) / len(members)), 6),
                           "advantage_mean": round(float(sum(float(sample_advantages[i]) for i in members))
                                                   / len(members), 6)}
    return f"{SUMMARY_PREFIX} {json.dumps(out, sort_keys=True)}"


def compute_advantage_by_hop(original: Callable) -> Callable:
    """Wrap verl 0.7.1's ``ray_trainer.compute_advantage`` so that ``hrpo`` groups by hop count.

    Same signature as the original. For ``adv_estimator == "hrpo"`` the wrapper runs the registered
    estimator itself with ``index`` = ``hop_group_index(data)``; any other estimator is the original
    call, untouched. Wrapping a wrapper returns it unchanged.
    """
    if getattr(original, MARKER, False):
        return original
    from verl.trainer.ppo import core_algos

    @functools.wraps(original)
    def compute_advantage(data, adv_estimator, gamma: float = 1.0, lam: float = 1.0, num_repeat: int = 1,
                          norm_adv_by_std_in_grpo: bool = True, config=None):
        name = getattr(adv_estimator, "value", adv_estimator)
        if name != HRPO:
            return original(data, adv_estimator, gamma=gamma, lam=lam, num_repeat=num_repeat,
                            norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo, config=config)
        # How the index gets in: the original's path for a registered estimator is just "response_mask
        # fallback, then estimator(token_level_rewards, response_mask, config, index=uid)". We make that
        # call here with index = hop groups. The alternative (overwrite non_tensor_batch["uid"] with the
        # hop groups, call the original, restore uid) would also work, but it mutates the batch for the
        # duration of the call and goes through verl's registry branch, which does not forward
        # norm_adv_by_std_in_grpo (the estimator would have to fall back to config). The direct call
        # touches nothing but advantages/returns and honours every argument.
        if "response_mask" not in data.batch.keys():
            from verl.trainer.ppo.ray_trainer import compute_response_mask

            data.batch["response_mask"] = compute_response_mask(data)
        estimator = core_algos.get_adv_estimator_fn(HRPO)
        advantages, returns = estimator(token_level_rewards=data.batch["token_level_rewards"],
                                        response_mask=data.batch["response_mask"], index=hop_group_index(data),
                                        norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo, config=config)
        data.batch["advantages"] = advantages
        data.batch["returns"] = returns
        # one line per step in the trainer's log: the groups really were hop counts (a GPU smoke checks it)
        print(group_summary(hop_group_index(data), data.batch["token_level_rewards"].sum(-1),
                            (advantages * data.batch["response_mask"]).sum(-1)
                            / data.batch["response_mask"].sum(-1).clamp(min=1)), flush=True)
        return data

    setattr(compute_advantage, MARKER, True)
    compute_advantage.__drzero_original__ = original
    return compute_advantage


def install_hrpo_wrapper() -> Callable:
    """Register ``hrpo`` and patch ``verl.trainer.ppo.ray_trainer.compute_advantage``; idempotent.

    Acts on the calling process only: call it where ``fit()`` runs (``HRPOTaskRunner.run`` does).
    Returns the installed wrapper.

    Only ``verl.trainer.ppo.ray_trainer`` is patched. ``verl/experimental/separation/ray_trainer.py``
    does ``from verl.trainer.ppo.ray_trainer import compute_advantage`` at import time and keeps its own
    reference, so that trainer would need its own patch; we do not use it.
    """
    from verl.trainer.ppo import ray_trainer

    register_hrpo()
    register_controls()
    current = ray_trainer.compute_advantage
    if not getattr(current, MARKER, False):
        ray_trainer.compute_advantage = compute_advantage_by_hop(current)
    return ray_trainer.compute_advantage


def hrpo_wrapper_installed() -> bool:
    """Whether this process's ``ray_trainer.compute_advantage`` is our wrapper."""
    from verl.trainer.ppo import ray_trainer

    return bool(getattr(ray_trainer.compute_advantage, MARKER, False))


def assert_estimator_resolves(name) -> Callable:
    """Raise ``ValueError`` (one line, with the fix) unless verl resolves advantage estimator ``name``.

    Registers ``hrpo`` first. verl only checks this at the first ``compute_advantage``, after worker
    start-up and a full rollout; call it before launching. Returns the estimator function.
    """
    from verl.trainer.ppo import core_algos

    register_hrpo()
    register_controls()
    value = getattr(name, "value", name)
    try:
        return core_algos.get_adv_estimator_fn(value)
    except ValueError:
        known = sorted(core_algos.ADV_ESTIMATOR_REGISTRY)
        close = difflib.get_close_matches(str(value), known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(
            f"algorithm.adv_estimator={value!r} is not a registered verl advantage estimator; {hint}"
            f"set algorithm.adv_estimator={HRPO} for the proposer (HRPO) or grpo for the solver "
            f"(registered: {', '.join(known)})") from None


def _task_runner_base():
    from verl.trainer.main_ppo import TaskRunner

    # 0.7.1 defines TaskRunner as a plain class and run_ppo wraps it with ray.remote(num_cpus=1) itself;
    # an already-remote class (ActorClass) could not be subclassed here.
    if hasattr(TaskRunner, "remote"):
        raise TypeError("verl.trainer.main_ppo.TaskRunner is a Ray actor class; this module expects verl 0.7.1's "
                        "plain TaskRunner")
    return TaskRunner


class HRPOTaskRunner(_task_runner_base()):
    """verl's TaskRunner with the HRPO ``compute_advantage`` wrapper installed inside the actor."""

    def run(self, config):
        install_hrpo_wrapper()
        install_training_metrics()  # reward extra info (budget_cut, probe_errors, ...) as training metrics
        return super().run(config)


def run_ppo_with_hrpo(config, task_runner_cls: type[HRPOTaskRunner] = HRPOTaskRunner) -> None:
    """verl's ``run_ppo`` with ``HRPOTaskRunner`` (or a subclass of it) as the TaskRunner actor.

    ``config`` is the composed verl config, prepared as verl's ``main()`` prepares it
    (``auto_set_device``, ``migrate_legacy_reward_impl``). ``algorithm.adv_estimator`` is checked
    here, in the driver, before Ray starts.
    """
    import ray
    from verl.trainer.main_ppo import run_ppo

    if not (isinstance(task_runner_cls, type) and issubclass(task_runner_cls, HRPOTaskRunner)):
        raise TypeError(f"task_runner_cls must be HRPOTaskRunner or a subclass of it, got {task_runner_cls!r}")
    assert_estimator_resolves(config.algorithm.adv_estimator)
    run_ppo(config, task_runner_class=ray.remote(num_cpus=1)(task_runner_cls))
