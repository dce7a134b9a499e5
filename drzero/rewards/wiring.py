"""Hydra overrides that plug our rewards into verl 0.7.1 (``reward.custom_reward_function.*``).

    reward_overrides("challenger", {"base_url": "http://127.0.0.1:8001", "model_name": "solver", "n": 5})
    -> ["reward.custom_reward_function.path=/…/drzero/rewards/verl_entry.py",
        "reward.custom_reward_function.name=proposer_compute_score",
        "+reward.custom_reward_function.reward_kwargs.base_url='http://127.0.0.1:8001'", …]

verl loads the reward by file path; ``reward_kwargs`` is not in verl's schema, so each key needs a
leading ``+``; config ``reward_kwargs`` win over call-time arguments.
"""

from __future__ import annotations

from pathlib import Path

from drzero.rewards import verl_entry

ENTRY_FILE = Path(verl_entry.__file__).resolve()
REWARD_FUNCTIONS = {"challenger": "proposer_compute_score", "solver": "solver_compute_score"}


def hydra_value(value) -> str:
    """A value as a Hydra override literal: strings quoted (URLs hold ':' and '/'), the rest as is."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    escaped = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


# The solver probes run under the limits training runs under; these reward kwargs are Hydra
# interpolations into the composed config, so an override of the training value moves both.
PROBE_LIMITS = {
    "max_response_tokens": "${data.max_response_length}",
    "max_turns": "${actor_rollout_ref.rollout.multi_turn.max_assistant_turns}",
    "max_tool_response_length": "${actor_rollout_ref.rollout.multi_turn.max_tool_response_length}",
    "tool_response_truncate_side": "${actor_rollout_ref.rollout.multi_turn.tool_response_truncate_side}",
}


def reward_overrides(stage: str, reward_kwargs: dict | None = None, probe_limits: bool = False) -> list[str]:
    if stage not in REWARD_FUNCTIONS:
        raise ValueError(f"stage={stage!r} is not valid: expected one of {sorted(REWARD_FUNCTIONS)}")
    overrides = [f"reward.custom_reward_function.path={ENTRY_FILE}",
                 f"reward.custom_reward_function.name={REWARD_FUNCTIONS[stage]}"]
    overrides += [f"+reward.custom_reward_function.reward_kwargs.{key}={hydra_value(value)}"
                  for key, value in (reward_kwargs or {}).items()]
    if probe_limits:
        overrides += [f"+reward.custom_reward_function.reward_kwargs.{key}={value}"
                      for key, value in PROBE_LIMITS.items()]
    return overrides
