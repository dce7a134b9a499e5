"""verl's command line: our Hydra config, the entry module, and the overrides every stage shares.

    python -m drzero.verl.entry --config-path=config --config-name=search_multiturn_grpo key=value ...

A stage builds its overrides here; ``compose`` builds the same config in this process, as
``drzero.verl.entry`` will, for the preflight and the memory plan.
"""

from __future__ import annotations

import sys

from drzero.config import option
from drzero.layout import config_dir
from drzero.rollout.render import THINKING_RESPONSE_LENGTH

CONFIG_NAME = "search_multiturn_grpo"
ROLLOUT_TP = 2
ENGINES = ("sglang", "hf")


def engine_option():
    return option("sglang", choices=list(ENGINES), help=(
        "rollout engine: sglang (production) or hf (transformers on the training GPU itself: slow, for "
        "debugging on a GPU without SGLang)"))


def engine_overrides(engine: str) -> list[str]:
    """verl keys for ``--engine``: none for SGLang; for hf its rollout name and no flash-attn."""
    if engine == "sglang":
        return []
    return ["actor_rollout_ref.rollout.name=hf",
            # no flash-attn with this engine: unpadding imports it, and verl's default attention is flash_attention_2
            "actor_rollout_ref.model.use_remove_padding=false",
            "+actor_rollout_ref.model.override_config.attn_implementation=sdpa"]


def thinking_overrides(thinking: bool | None) -> list[str]:
    """The same switch for verl's dataset and agent loop (data.apply_chat_template_kwargs) and our probes."""
    if thinking is None:
        return []
    overrides = [f"+data.apply_chat_template_kwargs.enable_thinking={'true' if thinking else 'false'}"]
    if thinking:
        overrides.append(f"data.max_response_length={THINKING_RESPONSE_LENGTH}")
    return overrides


def verl_command(overrides: list[str], extra: list[str] = ()) -> list[str]:
    return [sys.executable, "-m", "drzero.verl.entry", f"--config-path={config_dir()}",
            f"--config-name={CONFIG_NAME}", *overrides, *extra]


def compose(overrides: list[str]):
    """Our config + overrides, composed and migrated as ``drzero.verl.entry`` will; Hydra errors raised."""
    # Hydra and verl are imported only when a config is composed: `drzero --help` stays fast
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from verl.experimental.reward_loop.reward_loop import migrate_legacy_reward_impl

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        config = hydra_compose(config_name=CONFIG_NAME, overrides=overrides)
    migrate_legacy_reward_impl(config)
    return config
