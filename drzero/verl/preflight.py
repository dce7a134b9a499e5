"""`drzero preflight STAGE`: the checks that save a GPU-day, in seconds, on a CPU.

    drzero preflight challenger --iteration 1
    drzero preflight solver --iteration 2 -- actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4

It composes the stage's verl config exactly as the stage will (our YAML on verl's packaged
``ppo_trainer``, the stage's overrides, then yours), runs verl's own validation on it
(``migrate_legacy_reward_impl``, ``validate_config``, the typed config dataclasses — no Ray,
no GPU), and adds what verl only finds out minutes into a run or never: Hydra ``+key``
mistakes, missing or relative data and model paths, data no stage produces, batch sizes that do
not divide, dp x tp that does not match the GPUs, prompts over budget, unknown tool parsers, an
advantage estimator that does not resolve, SGLang API drift, flash-attn, a missing W&B key, and a
plan whose per-GPU memory does not fit (``drzero memory``).
Every failed check prints one line with its fix. GPU-only checks (SGLang, flash-attn) are
reported as skipped on a machine without CUDA.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from dataclasses import replace
from pathlib import Path

from drzero.checks import Check
from drzero.corpus.store import INDEX_CHECKED, CorpusStore, StoreError, read_index_check
from drzero.corpus.vector_file import has_side_file
from drzero.data.budget import PromptBudget, response_budget_for
from drzero.data.seed import SEED_MANIFEST
from drzero.layout import SEED_STEM
from drzero.models.memory import Placement
from drzero.models.registry import SGLANG_TOOL_PARSERS, VERL_TOOL_FORMATS
from drzero.models.shapes import ENCODER_SHAPES
from drzero.plan import FileSet, StagePlan
from drzero.records import DamagedRecord, Optional, read_record
from drzero.rewards.proposer import hops_of
from drzero.verl.memory_plan import memory_check
from drzero.verl.overrides import compose


class PreflightFailed(RuntimeError):
    """At least one check failed; the message lists each with its fix."""


def _hydra_fix(error: Exception) -> str:
    text = str(error)
    missing = re.search(r"Could not override '([^']+)'", text)
    if missing:
        return f"'{missing.group(1)}' is not in verl's config: write +{missing.group(1)}=... to add it"
    present = re.search(r"An item is already at '([^']+)'", text) or re.search(r"already at '([^']+)'", text)
    if present:
        return f"'{present.group(1)}' already exists in verl's config: drop the leading '+'"
    return text.splitlines()[0]


def _wandb_ready() -> bool:
    """A key in the environment or ~/.netrc, or W&B told to stay offline."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _sglang_installed() -> bool:
    return importlib.util.find_spec("sglang") is not None


GPU_MACHINE_HINT = ("run it in the GPU image (docker/Dockerfile), on Modal (`python -m backends.modal`) or with "
                    "`docker compose --profile gpu`; a dry run (--dry-run) works here")


def machine_check(plans: list[StagePlan]) -> Check:
    """Can this machine run these stages for real? Asked before anything starts, not minutes into a run.

    verl training and every SGLang server need CUDA; SGLang must be installed unless the stage uses
    ``--engine hf`` and no SGLang server (``--sglang-url`` points at one elsewhere).
    """
    needs_cuda, needs_sglang = [], []
    for plan in plans:
        starts_sglang = any("sglang.launch_server" in spec.command for spec in plan.services)
        verl_sglang = (plan.verl_overrides is not None
                       and "actor_rollout_ref.rollout.name=hf" not in plan.verl_overrides)
        if plan.verl_overrides is not None or starts_sglang:
            needs_cuda.append(plan.name)
        if starts_sglang or verl_sglang:
            needs_sglang.append(plan.name)
    missing = []
    if needs_cuda and not _cuda_available():
        missing.append(f"a CUDA GPU (for {', '.join(needs_cuda)}; torch sees none here)")
    if needs_sglang and not _sglang_installed():
        missing.append(f"SGLang (for {', '.join(needs_sglang)}; not installed here, or pass --engine hf to train "
                       f"with transformers)")
    if missing:
        return Check("machine", False, f"this machine lacks {' and '.join(missing)}: {GPU_MACHINE_HINT}")
    return Check("machine", True, "CUDA and SGLang as needed" if needs_cuda or needs_sglang else "nothing GPU-only")


def _check_parquet(path_value, planned: set[Path], key: str, sets: tuple[FileSet, ...] = ()) -> Check:
    """Each data file: absolute, present (or written earlier in this run), readable, not empty, and, when it
    belongs to one of ``sets``, the file its manifest committed (not half of a set a kill left behind)."""
    from omegaconf import ListConfig

    paths = list(path_value) if isinstance(path_value, (list, tuple, ListConfig)) else [path_value]
    for raw in paths:
        path = Path(str(raw))
        if not path.is_absolute():
            return Check(key, False, f"{raw} is a relative path; verl resolves it in Ray's working directory: "
                                     f"pass an absolute path")
        if path in planned:  # what is there now (if anything) is replaced before this stage reads it
            return Check(key, True, f"{path} will be written by an earlier stage of this run")
        if not path.exists():
            return Check(key, False, f"{path} does not exist and no stage of this run writes it; run "
                                     f"`drzero prepare-data` / `drzero gen-data` first")
        try:
            import pyarrow.parquet as pq

            rows = pq.read_metadata(path).num_rows
        except Exception as error:  # any unreadable file is the same finding
            return Check(key, False, f"{path} is not a readable parquet file ({error}); regenerate it")
        if rows == 0:
            return Check(key, False, f"{path} has no rows")
        refusal = next((r for fileset in sets if path in fileset.files and (r := fileset.refusal())), None)
        if refusal is not None:
            return Check(key, False, refusal)
    return Check(key, True, ", ".join(str(p) for p in paths))


# What preflight reads of the manifest beside a data file (seed or solver data), all of it optional: a manifest
# without a key is measured another way; one that is damaged is reported by the data files' check.
MANIFEST_READS = {"prompt_tokens": Optional({"max": Optional(int)}), "tokenizer": Optional(str),
                  "hop_ratio": Optional(str), "search_results": SEED_MANIFEST["search_results"]}


def _manifest_beside(train: Path, *fallbacks: Path) -> dict | None:
    """The manifest drzero wrote beside a data file (``X.parquet`` -> ``X.manifest.json``), else a fallback's;
    None when there is none or it is damaged (so the budgets are measured without it)."""
    stem = train.name[:-len(".parquet")] if train.name.endswith(".parquet") else train.name
    for candidate in (train.with_name(f"{stem}.manifest.json"), *fallbacks):
        try:
            manifest = read_record(candidate, MANIFEST_READS)
        except DamagedRecord:
            continue
        if manifest is not None:
            return manifest
    return None


@functools.lru_cache(maxsize=4)
def _tokenizer_of(model_dir: str):
    """The model's tokenizer, loaded once for every check and every stage a preflight looks at."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _prompt_budget(config, planned: set[Path]) -> Check:
    """The longest rendered prompt (tools included) against data.max_prompt_length.

    The manifest drzero writes beside its data records the exact maximum; without one, the 50
    longest prompts by characters are rendered with the model's tokenizer.
    """
    train = Path(str(config.data.train_files if isinstance(config.data.train_files, str)
                     else config.data.train_files[0]))
    budget = int(config.data.max_prompt_length)
    if not train.exists() or train in planned:
        return Check("prompt budget", True, "checked when the data is written", skipped=True)
    longest = ((_manifest_beside(train) or {}).get("prompt_tokens") or {}).get("max")
    if longest is None:
        model = Path(str(config.actor_rollout_ref.model.path))
        if not model.is_dir():
            return Check("prompt budget", True, "no manifest and no local tokenizer to measure with", skipped=True)
        import pyarrow.parquet as pq


        prompts = pq.read_table(train, columns=["prompt"]).column("prompt").to_pylist()
        prompts.sort(key=lambda messages: -sum(len(m["content"]) for m in messages))
        from omegaconf import OmegaConf

        kwargs = config.data.get("apply_chat_template_kwargs")
        kwargs = OmegaConf.to_container(kwargs) if kwargs is not None else {}
        budget_counter = PromptBudget(_tokenizer_of(str(model)), kwargs)
        longest = max(budget_counter.rendered_length(messages) for messages in prompts[:50])
    if longest > budget:
        return Check("prompt budget", False, f"the longest prompt is {longest} tokens (tools included) but "
                                             f"data.max_prompt_length={budget}; raise it or make the prompts shorter "
                                             f"(prepare-data --max-doc-tokens)")
    return Check("prompt budget", True, f"longest prompt {longest} <= {budget} tokens")


def response_budget(config) -> Check:
    """The worst-case trajectory of each hop count (and the solver's) against data.max_response_length.

    verl ends an episode, unanswered, when the next tool result does not fit the response budget;
    the table (drzero.data.budget) shows each shape's tool and model tokens.
    """
    from omegaconf import OmegaConf


    train = Path(str(OmegaConf.select(config, "data.train_files")))
    manifest = _manifest_beside(train, train.parent / f"{SEED_STEM}.manifest.json")
    model = Path(str(config.actor_rollout_ref.model.path))
    tokenizer = _tokenizer_of(str(model)) if (model / "tokenizer_config.json").is_file() else None
    # the corpus density in the manifest holds for the tokenizer it was measured with, not another model's
    measured_with = str((manifest or {}).get("tokenizer") or "")
    same_tokenizer = measured_with == str(model) or (Path(measured_with).is_dir() and model.is_dir()
                                                     and Path(measured_with).resolve() == model.resolve())
    budget = response_budget_for(config, tokenizer, manifest if same_tokenizer else None)
    proposer = str(OmegaConf.select(config, "reward.custom_reward_function.name", default="")).startswith("proposer")
    max_hops = len(str(manifest["hop_ratio"])) if (manifest or {}).get("hop_ratio") else \
        _most_hops_in(train) if proposer else 4
    rows = budget.rows(max_hops, ("proposer", "solver") if proposer else ("solver",))
    table = budget.table(rows).replace("\n", "\n        ")
    too_long = [r for r in rows if not r.fits]
    if too_long:
        return Check("response budget", False, f"{len(too_long)} trajectory shape(s) do not fit: raise "
                     f"data.max_response_length to {budget.required_length(rows)} or lower "
                     f"actor_rollout_ref.rollout.multi_turn.max_tool_response_length\n        {table}")
    return Check("response budget", True, "worst case fits\n        " + table)


def _most_hops_in(train: Path) -> int:
    """The largest hop count among the proposer rows of ``train`` (their ``data_source``); 4 when unreadable."""

    try:
        import pyarrow.parquet as pq

        sources = set(pq.read_table(train, columns=["data_source"]).column("data_source").to_pylist())
        return max(hops_of(str(s), None) for s in sources)
    except Exception:  # a missing or foreign file is another check's finding; assume Dr. Zero's 4 hops
        return 4


def corpus_check(store: Path | str, collection: str, planned: set[Path] = frozenset()) -> Check:
    """The store and collection the stage's retriever will serve: present, not empty, recording its embedder."""
    if store in planned:
        return Check("corpus", True, f"{store} is written earlier in this run")

    try:
        opened = CorpusStore.open_existing(store, collection)
    except StoreError as error:
        return Check("corpus", False, str(error))
    verify = f"run `drzero ingest --verify --db {store} --collection {collection}` (it re-embeds what the index lost)"
    try:
        recorded = read_index_check(store, collection)
    except DamagedRecord as damage:
        return Check("corpus", False, f"the index-check record of collection {collection!r} is damaged ({damage}); "
                                      f"{verify}")
    if recorded is not None and recorded["state"] != INDEX_CHECKED:
        return Check("corpus", False, f"the last `drzero ingest` into {store} wrote passages and stopped before "
                                      f"checking the vector index (killed, or still running); {verify}")
    spec = opened.recorded_spec()
    return Check("corpus", True, f"{store} collection {collection!r}: {opened.count()} passages, embedder "
                                 f"{spec.name}")


def _model_path(config, allow_download: bool) -> Check:
    path = str(config.actor_rollout_ref.model.path)
    if Path(path).is_dir():
        if not (Path(path) / "config.json").is_file():
            return Check("model path", False, f"{path} has no config.json: not a Hugging Face model directory")
        return Check("model path", True, path)
    if path.startswith((".", "/", "~")):
        return Check("model path", False, f"{path} does not exist; it is produced by `drzero merge` of the previous "
                                          f"iteration, or copy the weights there")
    if allow_download:
        return Check("model path", True, f"{path} will be downloaded from the hub (--allow-download)")
    return Check("model path", False, f"{path} is not on disk; put the weights in $DRZERO_MODELS_DIR/"
                                      f"{Path(path).name} (see `drzero list-models`) or pass --allow-download")


def _root_message(error: BaseException) -> str:
    """The innermost cause's first line: Hydra's instantiate wraps verl's own message."""
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _micro_batches(config) -> Check:
    """The seed guide's first error, named with its fix before verl's own message."""
    from omegaconf import OmegaConf

    if OmegaConf.select(config, "actor_rollout_ref.actor.use_dynamic_bsz"):
        return Check("micro batch sizes", True, "dynamic batch size")
    unset = []
    for section, key in (("actor", "ppo_micro_batch_size"), ("rollout", "log_prob_micro_batch_size"),
                         ("ref", "log_prob_micro_batch_size")):
        base = f"actor_rollout_ref.{section}.{key}"
        if OmegaConf.select(config, base) is None and OmegaConf.select(config, base + "_per_gpu") is None:
            unset.append(base + "_per_gpu")
    if unset:
        return Check("micro batch sizes", False, "unset: " + ", ".join(unset) + "; set each, e.g. "
                     + " ".join(f"{key}=2" for key in unset))
    return Check("micro batch sizes", True)


def _batches(config) -> list[Check]:
    n_gpus = int(config.trainer.n_gpus_per_node) * int(config.trainer.nnodes)
    n = int(config.actor_rollout_ref.rollout.n)
    train = int(config.data.train_batch_size)
    mini = int(config.actor_rollout_ref.actor.ppo_mini_batch_size)
    tp = int(config.actor_rollout_ref.rollout.tensor_model_parallel_size)
    checks = []
    if mini > train:
        checks.append(Check("batch sizes", False, f"actor.ppo_mini_batch_size={mini} > data.train_batch_size={train};"
                                                  f" set actor_rollout_ref.actor.ppo_mini_batch_size<={train}"))
    elif (train * n) % n_gpus or (mini * n) % n_gpus:
        checks.append(Check("batch sizes", False, f"train_batch_size x n = {train * n} and ppo_mini_batch_size x n = "
                                                  f"{mini * n} must both divide by {n_gpus} GPUs"))
    else:
        checks.append(Check("batch sizes", True, f"{train} prompts x n={n} over {n_gpus} GPUs"))
    if n_gpus % tp:
        checks.append(Check("rollout tp", False, f"rollout.tensor_model_parallel_size={tp} does not divide {n_gpus} "
                                                 f"GPUs"))
    return checks


def run_checks(plan: StagePlan, *, planned: set[Path] = frozenset(), allow_download: bool = False,
               gpu_checks: bool | None = None) -> list[Check]:
    """Every check for ``plan``; never raises for a finding."""
    checks: list[Check] = []
    try:
        config = compose(plan.verl_overrides or [])
    except Exception as error:  # Hydra's override errors have several types; all are findings here
        return [Check("hydra overrides", False, _hydra_fix(error))]
    checks.append(Check("hydra overrides", True, f"{len(plan.verl_overrides or [])} overrides compose"))

    from omegaconf import OmegaConf

    try:
        OmegaConf.resolve(config)
    except Exception as error:
        return checks + [Check("config resolves", False, str(error).splitlines()[0])]

    for key in ("actor_rollout_ref.rollout.multi_turn.tool_config_path", "reward.custom_reward_function.path",
                "trainer.default_local_dir"):
        value = OmegaConf.select(config, key)
        if value and not Path(str(value)).is_absolute():
            checks.append(Check(key, False, f"{value} is relative; Ray workers run elsewhere: pass an absolute path"))
        elif value and key != "trainer.default_local_dir" and not Path(str(value)).is_file():
            checks.append(Check(key, False, f"{value} does not exist"))
    train_files = _check_parquet(config.data.train_files, planned, "data.train_files", plan.reads_sets)
    val_files = _check_parquet(config.data.val_files, planned, "data.val_files", plan.reads_sets)
    if not val_files.ok and val_files.message == train_files.message:  # one half-replaced set, said once
        val_files = Check("data.val_files", False, "part of the same set as data.train_files (above)")
    checks += [train_files, val_files]
    checks.append(_prompt_budget(config, planned) if train_files.ok
                  else Check("prompt budget", True, "no readable train file to measure", skipped=True))
    checks.append(response_budget(config))
    checks.append(_model_path(config, allow_download) if Path(str(config.actor_rollout_ref.model.path)) not in planned
                  else Check("model path", True, "written by `drzero merge` earlier in this run"))
    if plan.corpus is not None:
        checks.append(corpus_check(*plan.corpus, planned))
    checks.append(_micro_batches(config))
    checks += _batches(config)

    # verl's own validation, as the trainer would run it minutes into the job
    try:
        from verl.utils.config import validate_config

        use_ref = bool(config.actor_rollout_ref.actor.use_kl_loss or config.algorithm.use_kl_in_reward)
        validate_config(config, use_reference_policy=use_ref, use_critic=config.algorithm.adv_estimator == "gae")
        from verl.utils.config import omega_conf_to_dataclass

        omega_conf_to_dataclass(config.algorithm)
        omega_conf_to_dataclass(config.actor_rollout_ref.rollout)
        checks.append(Check("verl validate_config", True))
    except Exception as error:
        checks.append(Check("verl validate_config", False, _root_message(error)))


    # lazy: drzero.verl.hrpo subclasses verl's TaskRunner, and importing it loads verl and torch (seconds)
    from drzero.verl.hrpo import assert_estimator_resolves

    try:
        assert_estimator_resolves(str(config.algorithm.adv_estimator))
        checks.append(Check("advantage estimator", True, str(config.algorithm.adv_estimator)))
    except ValueError as error:
        checks.append(Check("advantage estimator", False, str(error)))

    fmt = str(config.actor_rollout_ref.rollout.multi_turn.format)
    checks.append(Check("tool parser", fmt in VERL_TOOL_FORMATS,
                        fmt if fmt in VERL_TOOL_FORMATS else f"multi_turn.format={fmt!r} is not a verl 0.7.1 parser; "
                        f"use one of {sorted(VERL_TOOL_FORMATS)} (hermes for Qwen)"))
    if plan.sglang_parser is not None:
        ok = plan.sglang_parser in SGLANG_TOOL_PARSERS
        checks.append(Check("sglang tool parser", ok, plan.sglang_parser if ok else
                            f"--tool-call-parser {plan.sglang_parser} is unknown to SGLang; use one of "
                            f"{sorted(SGLANG_TOOL_PARSERS)}"))
    if plan.sglang_gpus is not None:
        dp, tp = plan.sglang_gpus
        n_gpus = int(config.trainer.n_gpus_per_node)
        checks.append(Check("sglang dp x tp", dp * tp == n_gpus, f"{dp} x {tp} = {dp * tp} GPUs" if dp * tp == n_gpus
                            else f"--sglang-dp {dp} x --sglang-tp {tp} = {dp * tp}, but the node has {n_gpus} GPUs"))

    if "wandb" in [str(x) for x in config.trainer.logger]:
        has_key = _wandb_ready()
        checks.append(Check("wandb", has_key, "key found" if has_key else
                            "logging to W&B but no WANDB_API_KEY; set it, or WANDB_MODE=offline, or --logger console"))

    checks.append(_memory(config, plan, planned))
    checks += gpu_only_checks(config, gpu_checks)
    return checks


def _memory(config, plan: StagePlan, planned: set[Path] = frozenset()) -> Check:
    """Per-GPU memory of every phase (drzero.models.memory) against the GPU, with the smallest fix."""
    stage = plan.name.split(" ")[0]
    ok, message, skipped = memory_check(config, with_store_size(plan.memory, plan.corpus, planned), stage)
    return Check("memory", ok, message, skipped=skipped)


def with_store_size(placement: Placement | None, corpus: tuple[Path | str, str] | None,
                    planned: set[Path] = frozenset()) -> Placement | None:
    """The placement with its retriever's index sized from the store it will serve: its passages and the encoder
    the collection records. A store not written yet, or unreadable (the corpus check says why), stays unsized."""
    if placement is None or placement.retriever is None or corpus is None or corpus[0] in planned:
        return placement
    try:
        store = CorpusStore.open_existing(*corpus)
    except StoreError:
        return placement
    spec = store.recorded_spec()
    encoder = ENCODER_SHAPES.get(spec.name if spec else "", placement.retriever.encoder)
    return replace(placement, retriever=replace(placement.retriever, encoder=encoder, passages=store.count(),
                                                side_file=has_side_file(store)))


def gpu_only_checks(config, enabled: bool | None = None) -> list[Check]:
    """SGLang symbols verl imports (API drift) and flash-attn; skipped without CUDA unless forced."""
    enabled = _cuda_available() if enabled is None else enabled
    if not enabled:
        return [Check("sglang API", True, "no CUDA here; checked on the GPU machine", skipped=True),
                Check("flash-attn", True, "no CUDA here; checked on the GPU machine", skipped=True)]
    from omegaconf import OmegaConf

    checks = []
    engine = OmegaConf.select(config, "actor_rollout_ref.rollout.name")
    if engine != "sglang":   # --engine hf: transformers generates, SGLang is not imported
        checks.append(Check("sglang API", True, f"not used (rollout.name={engine})", skipped=True))
    else:
        try:
            # what verl 0.7.1's SGLang rollout imports; an ImportError here is the drift the seed guide hit
            import verl.workers.rollout.sglang_rollout.async_sglang_server  # noqa: F401
            import verl.workers.rollout.sglang_rollout.sglang_rollout  # noqa: F401

            checks.append(Check("sglang API", True, "verl's SGLang rollout imports"))
        except Exception as error:
            checks.append(Check("sglang API", False, f"{type(error).__name__}: {error}; the image's SGLang does not "
                                                     f"match verl 0.7.1 (use the pinned docker/Dockerfile)"))

    attn = OmegaConf.select(config, "actor_rollout_ref.model.override_config.attn_implementation")
    if attn and attn != "flash_attention_2":
        checks.append(Check("flash-attn", True, f"not needed (attn_implementation={attn})", skipped=True))
    else:
        try:
            import flash_attn  # noqa: F401

            checks.append(Check("flash-attn", True, flash_attn.__version__))
        except Exception as error:
            checks.append(Check("flash-attn", False, f"cannot import flash_attn ({error}); install the prebuilt wheel "
                                                     f"or set +actor_rollout_ref.model.override_config."
                                                     f"attn_implementation=sdpa"))
    return checks
