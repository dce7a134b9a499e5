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
"""

from __future__ import annotations

from verl.experimental.agent_loop.tool_agent_loop import AgentState, ToolAgentLoop

BUDGET_CUT_FIELD = "budget_cut"


class BudgetedToolAgentLoop(ToolAgentLoop):
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
