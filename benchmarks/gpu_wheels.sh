#!/usr/bin/env bash
# The wheels a bare GPU machine (Python 3.12, torch, transformers; no ray, verl) needs for the `hf` engine runs
# of benchmarks/gpu_smoke.py and benchmarks/learning_curve.py: ray 2.41.0 without its Java jar (37 MB) and the
# 24 wheels verl 0.7.1 imports (6 MB). The list and the reasons are in the reference note
# "verl-gpu-step-without-sglang.md" (section 6); the jar serves Java workers only (section 5).
#
#     benchmarks/gpu_wheels.sh .bench/verl-wheels     # a folder git ignores; ~44 MB; carried with the command
#
# Needs pip and PyPI on this machine, not on the GPU machine.
set -euo pipefail
out=${1:?usage: benchmarks/gpu_wheels.sh OUT_DIR}
mkdir -p "$out"
platform=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
          --platform manylinux_2_5_x86_64)
python3 -m pip download -q --no-deps "${platform[@]}" -d "$out" \
    ray==2.41.0 verl==0.7.1 pydantic_core==2.50.5 datasets==5.2.0 pydantic==2.14.4 tensordict==0.10.0 \
    rpds_py==2026.9.1 hydra_core==1.3.8 multiprocess==0.70.19 pylatexenc==2.11 orjson==3.13.0 dill==0.4.1 \
    jsonschema==4.26.0 jsonschema_specifications==2025.9.1 referencing==0.37.0 omegaconf==2.3.1 torchdata==0.11.0 \
    importlib_metadata==10.2.0 lazy_importer==0.1.0 cachetools==8.0.2 typing_inspection==0.4.5 \
    annotated_types==0.8.0 pyvers==0.1.0 codetiming==1.4.0
# antlr4-python3-runtime 4.9.3 (hydra's parser runtime) is published as a source archive only
python3 -m pip wheel -q --no-deps -w "$out" antlr4-python3-runtime==4.9.3
ray_wheel=$(ls "$out"/ray-2.41.0-*.whl)
if [ "$(unzip -Z1 "$ray_wheel" | grep -c '^ray/jars/')" != 0 ]; then    # grep -q would break the pipe (pipefail)
    zip -q -d "$ray_wheel" 'ray/jars/*'
fi
ls "$out" | wc -l
du -sh "$out"
