"""The checks of `steering_vectors`, judged inside the asset on the readout it just wrote (`check_specs`):
every vector finite and of unit norm, and the manifest agreeing with the tensors and the stats table."""

import json
from pathlib import Path

import dagster as dg
import pandas as pd
import torch
from safetensors.torch import load_file

from carl_assets.steering import MANIFEST_FILE, VECTORS_FILE, readout_problems

UNIT_NORM = dg.AssetCheckSpec(
    "vectors_finite_unit_norm", asset="steering_vectors", blocking=True,
    description="Every vector finite and of unit norm (float32, one row per concept).")
MANIFEST_AGREES = dg.AssetCheckSpec(
    "manifest_matches_tensors", asset="steering_vectors", blocking=True,
    description="manifest.json and vectors.safetensors agree: keys = layers, shapes = [n_concepts, hidden], "
    "pair counts for exactly the concepts; stats table covers them.")


def _skipped_reason(folder: Path) -> str:
    """The `skipped_reason` of a readout's manifest ("" for a readout with emotions)."""
    return str(json.loads((folder / MANIFEST_FILE).read_text()).get("skipped_reason", ""))


def vectors_finite_unit_norm(folder: Path) -> dg.AssetCheckResult:
    """The unit-norm check on a readout folder: every tensor finite, every row of norm 1 (to 1e-4); an
    explicit empty readout passes, saying why it is empty."""
    tensors = load_file(str(folder / VECTORS_FILE))
    skipped = _skipped_reason(folder)
    worst, finite = 0.0, True
    for t in tensors.values():
        finite = finite and bool(torch.isfinite(t).all())
        if finite and t.numel():
            worst = max(worst, float((t.double().norm(dim=-1) - 1).abs().max()))
    metadata = {"tensors": len(tensors), "finite": finite, "max_abs_norm_error": worst}
    if skipped and not tensors:  # an explicit empty readout: nothing to check, and it says why
        return dg.AssetCheckResult(check_name=UNIT_NORM.name, passed=True, description=f"skipped: {skipped}",
                                   metadata={**metadata, "skipped_reason": skipped})
    problems = [text for bad, text in (
        (not tensors, "vectors.safetensors holds no tensor and the manifest gives no skipped_reason"),
        (not finite, "some vectors are not finite"),
        (worst > 1e-4, f"rows are not unit norm (max |norm - 1| = {worst:.2e})")) if bad]
    description = ("; ".join(problems) + ": rematerialize steering_vectors" if problems
                   else f"{len(tensors)} layers, unit rows")
    return dg.AssetCheckResult(check_name=UNIT_NORM.name, passed=not problems, metadata=metadata,
                               description=description)


def manifest_matches_tensors(folder: Path, stats: pd.DataFrame) -> dg.AssetCheckResult:
    """The manifest check on a readout folder and its `steering_vector_stats`: `readout_problems`, and the
    stats cover every concept and layer of the manifest."""
    problems = readout_problems(folder)
    manifest = json.loads((folder / MANIFEST_FILE).read_text()) if (folder / MANIFEST_FILE).exists() else {}
    concepts = set(manifest.get("concepts", []))
    if not concepts <= set(stats["emotion"]):
        problems.append("steering_vector_stats lacks some manifest concepts")
    if not set(manifest.get("layers", [])) <= set(stats["layer"].astype(int)):
        problems.append("steering_vector_stats lacks some manifest layers")
    skipped = str(manifest.get("skipped_reason", ""))
    description = "; ".join(problems) + ": rematerialize steering_vectors" if problems else (
        f"skipped: {skipped}" if skipped
        else f"{len(concepts)} concepts agree with the tensors and the stats")
    return dg.AssetCheckResult(
        check_name=MANIFEST_AGREES.name, passed=not problems, description=description,
        metadata={"problems": dg.MetadataValue.json(problems), "concepts": len(concepts),
                  "layers": dg.MetadataValue.json(manifest.get("layers", [])),
                  **({"skipped_reason": skipped} if skipped else {})},
    )


def readout_checks(folder: Path, stats: pd.DataFrame) -> list[dg.AssetCheckResult]:
    """Both checks on a readout folder the asset just wrote and its stats."""
    return [vectors_finite_unit_norm(folder), manifest_matches_tensors(folder, stats)]
