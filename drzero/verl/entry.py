"""verl's trainer behind drzero: ``python -m drzero.verl.entry`` is ``verl.trainer.main_ppo`` with HRPO.

    python -m drzero.verl.entry --config-path=/abs/config --config-name=search_multiturn_grpo key=value ...
    python -m drzero.verl.entry --config-path=/abs/config --config-name=search_multiturn_grpo --cfg job ...

The stage commands (`drzero challenger`, `drzero solver`) build the command line; a user never
needs to. It does what verl's own ``main`` does — migrate the legacy reward keys, then
``run_ppo`` — with our TaskRunner, which installs the hop-grouped advantage (HRPO) inside the
process that trains. Every other estimator passes through unchanged. With
``actor_rollout_ref.rollout.name=hf`` (``--engine hf``) the TaskRunner is ``HFTaskRunner``, which adds the
``transformers`` rollout engine of ``drzero.verl.hf.worker``.
"""

from __future__ import annotations

import hydra
from verl.experimental.reward_loop.reward_loop import migrate_legacy_reward_impl

from drzero.verl.hrpo import run_ppo_with_hrpo


@hydra.main(config_path=None, config_name=None, version_base=None)
def main(config) -> None:
    migrate_legacy_reward_impl(config)
    if config.actor_rollout_ref.rollout.name == "hf":
        # lazy: the hf engine's worker subclasses verl's FSDP workers; only an --engine hf run loads them
        from drzero.verl.hf.worker import HFTaskRunner

        run_ppo_with_hrpo(config, HFTaskRunner)
    else:
        run_ppo_with_hrpo(config)


if __name__ == "__main__":
    main()
