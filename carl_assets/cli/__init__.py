"""`carl`: the project's one command line, thin over the library and over Dagster's own run machinery.

    carl phi --logits-file logits.npy
    carl reward --logits-file logits.npy --token-ids-file ids.npy
    carl gate-check --phi 0.85
    carl constants
    carl train --method sft|grpo --model ID_OR_PATH --dataset FILE_OR_NAME --output DIR --max-steps N
    carl agent --model PATH --task "Click the submit button" [--observation TEXT]
    carl readout --text "..." [--vectors DIR] [--model PATH] [--layer N]
    carl materialize [--select SEL | --job JOB] [--preset offline|real] [--config FILE] [--home DIR]
    carl lineage [ASSET] | carl lineage --nodes grpo_checkpoint [--version V]
    carl sft-rank --model DIR --dataset DIR --output DIR --config JSON   (one rank; what torchrun starts)

`phi`, `reward`, `gate-check` and `constants` print the same figures as the reference script. Bad input
(a missing file, wrong shapes, ids outside the vocabulary, NaN or +inf logits — named by position;
-inf is an impossible token and fine —, a NaN or infinite number for a flag, unknown flags or
commands) gives a one-line error on stderr and exit status 2 (1 for a failure while running); set
``CARL_DEBUG=1`` to see the traceback instead. `train` and `agent` refuse a model folder holding only
pickle weights unless `--allow-pickle` is given, and run no remote code unless `--trust-remote-code`.
`materialize` and `lineage` go through the Dagster instance in `$DAGSTER_HOME`, so their runs show up in
`dagster dev`; `dg list defs`, `dg check defs` and `dg launch --assets ...` work on the same definitions.
"""

from carl_assets.cli.app import UsageError, build_parser, main

__all__ = ["UsageError", "build_parser", "main"]
