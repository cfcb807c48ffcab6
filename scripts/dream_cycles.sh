#!/usr/bin/env bash
# Three dream cycles in a fresh home: the whole graph once (cycle 0, from base_model), then the
# `retraining` job twice (cycles 1 and 2, each from the previous cycle's GRPO checkpoint). Prints the
# per-cycle figures the README records.
#   usage: [CARL_PRESET=offline|real] [CARL_CONFIG=FILE] scripts/dream_cycles.sh [HOME_DIR]
#   CARL_PRESET: the run-config preset (default offline; real = SmolLM2-135M-Instruct with the real budgets);
#   CARL_CONFIG: a run-config file laid over the preset; HOME_DIR: default a new temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."
home="${1:-$(mktemp -d)}"
export CARL_HOME="$home/carl" DAGSTER_HOME="$home/dagster" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$DAGSTER_HOME" && printf 'telemetry:\n  enabled: false\n' > "$DAGSTER_HOME/dagster.yaml"
run_args=(--preset "${CARL_PRESET:-offline}")
if [ -n "${CARL_CONFIG:-}" ]; then run_args+=(--config "$CARL_CONFIG"); fi
.venv/bin/carl materialize "${run_args[@]}" 2>"$home/cycle0.log" | tail -25
for cycle in 1 2; do
  .venv/bin/carl materialize --job retraining "${run_args[@]}" 2>"$home/cycle$cycle.log" | tail -15
done
.venv/bin/python - "$CARL_HOME/carl.duckdb" <<'PY'
import sys
from carl_assets import storage
db = sys.argv[1]
cycles = storage.read_table(db, "dream_cycles")
events = storage.read_table(db, "crystallization_events")
rewards = storage.read_table(db, "grpo_rewards")
summary = storage.read_table(db, "agent_evaluation_summary")
cols = ["cycle", "policy_asset", "temperature", "learning_rate", "dreams", "responses", "reject_fraction",
        "score_mean", "score_std", "no_signal_fraction", "score_spread_mean", "heldout_bar", "heldout_pass_rate",
        "heldout_score_mean"]
print(cycles[cols].to_string(index=False))
print(events[["dream_cycle", "started_from", "crystallized", "trigger_step", "steps", "final_accuracy"]].to_string(index=False))
print(summary.to_string(index=False))
PY
echo "home: $home"
