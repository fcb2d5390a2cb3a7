#!/usr/bin/env bash
# The main job: set up, prepare the offline data, and compare base / SAM / FlatPO / EFlat-LoRA on the built-in
# few-shot Fine Foods task (MiniLM + LoRA), 3 seeds. Prints the results table; writes runs/main/.
# Extra arguments go to `flatpeft compare` (e.g. --overwrite, --seeds 5, --set data.shots=64).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
flatpeft data prepare --only finefoods,minilm
flatpeft compare finefoods_fewshot --methods base,sam,flatpo,eflat-lora --seeds 3 --output-dir runs/main "$@"
