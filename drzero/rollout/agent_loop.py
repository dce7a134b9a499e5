"""verl 0.7.1's tool agent loop, recording when the response budget ended an episode.

    # config/agent_loop_config.yaml, named by actor_rollout_ref.rollout.agent.agent_loop_config_path
    - name: tool_agent
      _target_: drzero.rollout.agent_loop.BudgetedToolAgentLoop

``ToolAgentLoop`` ends an episode without a word when the response reaches
``data.max_response_length`` or when the next tool result would not fit in it; the trajectory
then has no answer and scores 0. This subclass changes nothing about the loop; it only notes that
it happened, as ``extra_fields[BUDGET_CUT_FIELD] = 1``. verl hands a trajectory's extra fields to
the reward function inside ``extra_info``, and both rewards return it as ``budget_cut``, which
``drzero.rewards.metrics`` logs as a training metric. Registered under verl's own name
``tool_agent``, so the data rows need no change.

With ``DRZERO_TRAJECTORY_DUMP=DIR`` in the agent-loop workers' environment it also appends each finished
trajectory's response token ids and response mask (1 = the model's own tokens, the loss mask; 0 = tool
results) to ``DIR/trajectories-<pid>.jsonl``, the first ``DRZERO_TRAJECTORY_DUMP_LIMIT`` (default 512) per
worker: verl's rollout dump holds decoded text only, and a loss-mask check needs the tokens
(``benchmarks/learning_curve.py``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from verl.experimental.agent_loop.tool_agent_loop import AgentState, ToolAgentLoop

BUDGET_CUT_FIELD = "budget_cut"
TRAJECTORY_DUMP_ENV = "DRZERO_TRAJECTORY_DUMP"
TRAJECTORY_DUMP_LIMIT_ENV = "DRZERO_TRAJECTORY_DUMP_LIMIT"
_dumped = 0


def dump_trajectory(output, directory: str | None = None) -> bool:
    """Append ``output``'s response ids and mask (an ``AgentLoopOutput``) to this process's dump file, when a
    dump folder is set and the limit is not reached. Returns whether it wrote."""
    global _dumped
    directory = directory or os.environ.get(TRAJECTORY_DUMP_ENV)
    if not directory or _dumped >= int(os.environ.get(TRAJECTORY_DUMP_LIMIT_ENV, "512")):
        return False
    _dumped += 1
    record = {"response_ids": [int(t) for t in output.response_ids],
              "response_mask": [int(m) for m in output.response_mask], "num_turns": int(output.num_turns)}
    Path(directory).mkdir(parents=True, exist_ok=True)
    with open(Path(directory) / f"trajectories-{os.getpid()}.jsonl", "a") as out:
        out.write(json.dumps(record) + "\n")
    return True


class BudgetedToolAgentLoop(ToolAgentLoop):
    async def run(self, sampling_params, **kwargs):
        output = await super().run(sampling_params, **kwargs)
        dump_trajectory(output)
        return output

    async def _handle_generating_state(self, agent_data, sampling_params, ignore_termination: bool = False):
        state = await super()._handle_generating_state(agent_data, sampling_params, ignore_termination)
        if state == AgentState.TERMINATED and len(agent_data.response_mask) >= self.response_length:
            agent_data.extra_fields[BUDGET_CUT_FIELD] = 1
        return state

    async def _handle_processing_tools_state(self, agent_data):
        before = len(agent_data.response_mask)
        state = await super()._handle_processing_tools_state(agent_data)
        # the only way out of this state without adding the tool tokens: they did not fit
        if state == AgentState.TERMINATED and len(agent_data.response_mask) == before:
            agent_data.extra_fields[BUDGET_CUT_FIELD] = 1
        return state
