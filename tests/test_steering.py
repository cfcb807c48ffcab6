"""Steering vectors: the readout files, agreement with the `steering-vectors` reference, token reduction
under padding, the zero-norm guard, held-out AUC, and the asset with its checks."""

from __future__ import annotations

import json

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import torch

from carl_assets.steering import (
    INDEX_CONVENTION,
    ReadoutConfig,
    ReadoutOptions,
    ResidualReader,
    SteeringVectors,
    ZeroNormError,
    auc,
    default_layers,
    heldout_mask,
    load_readout,
    readout_problems,
    save_readout,
    train_steering_vectors,
)
from carl_assets.steering.reference import import_train_steering_vector


def _records(groups: dict[str, tuple[list[str], list[str]]]) -> list[dict[str, str]]:
    rows = []
    for emotion, (pos, neg) in groups.items():
        rows += [{"emotion": emotion, "polarity": "positive", "text": t} for t in pos]
        rows += [{"emotion": emotion, "polarity": "negative", "text": t} for t in neg]
    return rows


@pytest.fixture(scope="module")
def groups(tiny_texts):
    # Overlapping texts across emotions (a text is positive for one and negative for another), as in
    # the real pairs; equal counts per emotion so the zipping reference sees every pair.
    return {
        "warmth": (tiny_texts[0:12], tiny_texts[12:24]),
        "frustration": (tiny_texts[12:22], tiny_texts[30:40]),
        "clarity": (tiny_texts[40:56], tiny_texts[0:16]),
    }


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_matches_steering_vectors_reference(tiny_model_and_tokenizer, groups, batch_size):
    model, tok = tiny_model_and_tokenizer
    train_steering_vector = import_train_steering_vector()
    ours = train_steering_vectors(
        model, tok, _records(groups), layers=[1, 2], batch_size=batch_size, reduction="last"
    )
    assert ours.concepts == sorted(groups)
    for k, concept in enumerate(ours.concepts):
        pos, neg = groups[concept]
        # Reference decoder_block n = output of block n = our residual index n + 1; read_token_index=-1
        # is the last real token (it adjusts for padding), our "last" reduction.
        ref = train_steering_vector(
            model, tok, list(zip(pos, neg, strict=True)), layers=[0, 1], read_token_index=-1, batch_size=4
        )
        for ref_layer, our_layer in [(0, 1), (1, 2)]:
            expected = ref.layer_activations[ref_layer]
            expected = expected / expected.norm()
            got = ours.vectors[our_layer][k]
            assert got.dtype == torch.float32
            assert _relative(got, expected) < 1e-5
            # raw (pre-normalisation) norm equals the reference's mean difference norm
            raw = ours.stats.set_index(["emotion", "layer"]).loc[(concept, our_layer), "raw_norm"]
            assert raw == pytest.approx(float(ref.layer_activations[ref_layer].norm()), rel=1e-5)


def test_vectors_are_unit_rows_and_shapes(tiny_model_and_tokenizer, groups):
    model, tok = tiny_model_and_tokenizer
    sv = train_steering_vectors(model, tok, pd.DataFrame(_records(groups)), layers=[2, 1], reduction="mean")
    assert sv.layers == [1, 2]
    for layer in sv.layers:
        assert sv.vectors[layer].shape == (3, 32) and sv.vectors[layer].dtype == torch.float32
        assert torch.allclose(sv.vectors[layer].norm(dim=-1), torch.ones(3), atol=1e-6)
    assert sv.pair_counts == {
        "clarity": {"positive": 16, "negative": 16},
        "frustration": {"positive": 10, "negative": 10},
        "warmth": {"positive": 12, "negative": 12},
    }
    assert set(sv.stats.columns) >= {
        "emotion",
        "layer",
        "n_positive",
        "n_negative",
        "raw_norm",
        "heldout_auc",
    }
    assert len(sv.stats) == 6


def _residual_alone(model, tok, text: str, layer: int) -> torch.Tensor:
    """The residual at `layer` for one text, no padding, from output_hidden_states (which equals the
    block output for every index but the last, where HF applies the final norm)."""
    enc = tok(text, return_tensors="pt")
    with torch.inference_mode():
        out = model(**enc, output_hidden_states=True)
    return out.hidden_states[layer][0]


@pytest.mark.parametrize("side", ["right", "left"])
def test_last_and_mean_reduction_under_padding(tiny_model_and_tokenizer, tiny_texts, side):
    model, tok = tiny_model_and_tokenizer
    texts = [tiny_texts[0], "a quiet morning", tiny_texts[3], "the deadline."]
    lengths = [len(tok(t)["input_ids"]) for t in texts]
    assert len(set(lengths)) > 2  # real padding in the batch
    tok.padding_side = side
    try:
        enc = tok(texts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = "right"
    assert (enc["attention_mask"] == 0).any()
    last = ResidualReader(model, [1], "last")(enc["input_ids"], enc["attention_mask"])
    mean = ResidualReader(model, [1], "mean")(enc["input_ids"], enc["attention_mask"])
    for row, text in enumerate(texts):
        alone = _residual_alone(model, tok, text, 1)
        assert torch.allclose(last[row, 0], alone[-1], atol=1e-5, rtol=1e-4)
        assert torch.allclose(mean[row, 0], alone.mean(dim=0), atol=1e-5, rtol=1e-4)
    # A bare [:, -1] under right padding would read a pad position: different numbers.
    if side == "right":
        with torch.inference_mode():
            bare = model(**enc, output_hidden_states=True).hidden_states[1][:, -1]
        shorter = [i for i, n in enumerate(lengths) if n < max(lengths)]
        assert not torch.allclose(bare[shorter], last[shorter, 0], atol=1e-3)


def test_left_padding_with_absolute_positions(tiny_model_and_tokenizer, tiny_texts):
    """GPT-2 adds absolute position embeddings (RoPE models are shift-invariant): a left-padded text
    reads as it would alone only because positions are counted from the attention mask."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tok = tiny_model_and_tokenizer
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tok),
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=128,
            pad_token_id=tok.pad_token_id,
        )
    ).eval()
    texts = [tiny_texts[0], "a quiet morning"]
    tok.padding_side = "left"
    try:
        enc = tok(texts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = "right"
    got = ResidualReader(gpt2, [0, 2], "last")(enc["input_ids"], enc["attention_mask"])
    for row, text in enumerate(texts):
        single = tok(text, return_tensors="pt")
        with torch.inference_mode():
            hidden = gpt2(**single, output_hidden_states=True).hidden_states
        assert torch.allclose(got[row, 0], hidden[0][0, -1], atol=1e-5)  # embeddings (+ positions)
        assert torch.allclose(got[row, 1], _block_output(gpt2, single, 1)[-1], atol=1e-5)


def _block_output(model, enc, block: int) -> torch.Tensor:
    out = {}
    handle = model.transformer.h[block].register_forward_hook(
        lambda m, i, o: out.__setitem__("x", o[0] if isinstance(o, tuple) else o)
    )
    with torch.inference_mode():
        model(**enc)
    handle.remove()
    return out["x"][0]


def test_deepest_layer_is_before_the_final_norm(tiny_model_and_tokenizer, tiny_texts):
    model, tok = tiny_model_and_tokenizer
    n_blocks = model.config.num_hidden_layers
    enc = tok(tiny_texts[:2], return_tensors="pt", padding=True)
    captured = {}
    handle = model.model.layers[-1].register_forward_hook(
        lambda m, i, o: captured.__setitem__("x", (o[0] if isinstance(o, tuple) else o).clone())
    )
    with torch.inference_mode():
        normed = model(**enc, output_hidden_states=True).hidden_states[n_blocks]
    handle.remove()
    got = ResidualReader(model, [n_blocks], "last")(enc["input_ids"], enc["attention_mask"])[:, 0]
    last = enc["attention_mask"].sum(dim=1) - 1
    expected = captured["x"][torch.arange(2), last]
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, normed[torch.arange(2), last], atol=1e-3)  # not the normed output


def test_layer_zero_is_the_embedding(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    enc = tok(["the warm kitchen"], return_tensors="pt")
    got = ResidualReader(model, [0], "mean")(enc["input_ids"], enc["attention_mask"])[0, 0]
    expected = model.get_input_embeddings().weight[enc["input_ids"][0]].mean(dim=0)
    assert torch.allclose(got, expected, atol=1e-6)


def test_forward_stops_after_the_deepest_layer(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    calls = []
    handle = model.model.layers[1].register_forward_hook(lambda *a: calls.append(1))
    head = model.lm_head.register_forward_hook(lambda *a: calls.append(2))
    try:
        enc = tok(["an old letter"], return_tensors="pt")
        ResidualReader(model, [1], "last")(enc["input_ids"], enc["attention_mask"])
        assert calls == []  # block 1 and the LM head never ran
        ResidualReader(model, [2], "last")(enc["input_ids"], enc["attention_mask"])
        assert calls == [1]  # the last block ran; the LM head did not
    finally:
        handle.remove()
        head.remove()


def test_zero_norm_guard(tiny_model_and_tokenizer, tiny_texts):
    model, tok = tiny_model_and_tokenizer
    same = tiny_texts[:6]
    rows = _records({"flat": (same, list(reversed(same))), "real": (tiny_texts[:6], tiny_texts[20:26])})
    with pytest.raises(ZeroNormError, match="flat"):
        train_steering_vectors(model, tok, rows, layers=[1, 2], reduction="last")
    sv = train_steering_vectors(model, tok, rows, layers=[1, 2], reduction="last", on_zero_norm="drop")
    assert sv.concepts == ["real"] and "flat" in sv.dropped
    assert sv.vectors[1].shape == (1, 32)
    assert bool(sv.stats.set_index("emotion").loc["flat", "zero_norm"].all())


def test_input_validation(tiny_model_and_tokenizer, tiny_texts):
    model, tok = tiny_model_and_tokenizer
    with pytest.raises(ValueError, match="no negative pairs"):
        train_steering_vectors(model, tok, _records({"x": (tiny_texts[:3], [])}), layers=[1])
    with pytest.raises(ValueError, match="polarity"):
        train_steering_vectors(model, tok, [{"emotion": "x", "polarity": "pos", "text": "a"}], layers=[1])
    with pytest.raises(ValueError, match="layers must be in"):
        train_steering_vectors(model, tok, _records({"x": (tiny_texts[:3], tiny_texts[3:6])}), layers=[3])
    with pytest.raises(ValueError, match="reduction"):
        train_steering_vectors(
            model, tok, _records({"x": (tiny_texts[:3], tiny_texts[3:6])}), reduction="max"
        )


def test_readout_config_is_the_keyword_settings(tiny_model_and_tokenizer, groups):
    """A `ReadoutConfig` and the same settings as keywords give identical vectors and stats; a keyword
    overrides the config's field; an unknown setting or a bad choice fails before any forward pass."""
    model, tok = tiny_model_and_tokenizer
    config = ReadoutConfig(layers=[1, 2], reduction="mean", heldout_fraction=0.25, seed=3)
    by_config = train_steering_vectors(model, tok, _records(groups), config)
    by_keywords = train_steering_vectors(
        model, tok, _records(groups), layers=[1, 2], reduction="mean", heldout_fraction=0.25, seed=3
    )
    for layer in (1, 2):
        assert torch.equal(by_config.vectors[layer], by_keywords.vectors[layer])
    pd.testing.assert_frame_equal(by_config.stats, by_keywords.stats)
    overridden = train_steering_vectors(model, tok, _records(groups), config, layers=[2])
    assert overridden.layers == [2] and torch.equal(overridden.vectors[2], by_config.vectors[2])
    with pytest.raises(TypeError, match="unknown"):
        train_steering_vectors(model, tok, _records(groups), config, unknown=1)
    # the one default, the steering_vectors asset's: the mean over tokens
    assert train_steering_vectors(model, tok, _records(groups), layers=[1]).reduction == "mean"
    with pytest.raises(ValueError, match="on_zero_norm must be 'raise' or 'drop'"):
        ReadoutOptions(on_zero_norm="ignore")
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        ReadoutConfig(batch_size=0)


def test_default_layers_spread_by_depth():
    assert default_layers(4) == [1, 2, 3, 4]
    assert default_layers(32) == [8, 16, 24, 32]
    assert default_layers(2) == [1, 2]
    assert default_layers(1) == [1]


def test_auc_and_heldout_split():
    assert auc(np.array([3.0, 4.0, 5.0]), np.array([0.0, 1.0, 2.0])) == 1.0
    assert auc(np.array([0.0]), np.array([1.0])) == 0.0
    assert auc(np.array([1.0, 1.0]), np.array([1.0])) == 0.5
    assert np.isnan(auc(np.array([]), np.array([1.0])))
    frame = pd.DataFrame(_records({"a": ([f"p{i}" for i in range(10)], [f"n{i}" for i in range(200)])}))
    held = heldout_mask(frame, 0.2, 30, seed=0)
    assert held[:10].sum() == 2 and held[10:].sum() == 30  # fraction, then the cap
    assert (held == heldout_mask(frame, 0.2, 30, seed=0)).all()  # deterministic
    assert (held != heldout_mask(frame, 0.2, 30, seed=1)).any()


def test_heldout_auc_detects_a_planted_direction(tiny_model_and_tokenizer, tiny_texts):
    """Texts with a marker word vs without: the mean-token direction separates held-out texts."""
    model, tok = tiny_model_and_tokenizer
    pos = [t + " kitchen kitchen warm warm" for t in tiny_texts[:40]]
    neg = tiny_texts[40:80]
    sv = train_steering_vectors(
        model, tok, _records({"marker": (pos, neg)}), layers=[1, 2], reduction="mean", heldout_fraction=0.25
    )
    assert (sv.stats["n_heldout_positive"] == 10).all()
    assert (sv.stats["heldout_auc"] > 0.9).all()


def test_readout_round_trip_and_problems(tiny_model_and_tokenizer, groups, tmp_path):
    model, tok = tiny_model_and_tokenizer
    sv = train_steering_vectors(
        model, tok, _records(groups), layers=[1, 2], reduction="last", model_name="tiny"
    )
    save_readout(sv, tmp_path, extra={"skipped": {"awe": {"positive": 1, "negative": 9}}})
    loaded = load_readout(tmp_path)
    assert isinstance(loaded, SteeringVectors)
    assert loaded.concepts == sv.concepts and loaded.layers == sv.layers
    assert loaded.pair_counts == sv.pair_counts and loaded.model == "tiny" and loaded.reduction == "last"
    for layer in sv.layers:
        assert torch.equal(loaded.vectors[layer], sv.vectors[layer])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["index_convention"] == INDEX_CONVENTION and manifest["hidden_size"] == 32
    assert manifest["token_reduction"] == "last" and manifest["skipped"]["awe"]["positive"] == 1
    assert manifest["tensor_keys"] == {"1": "layer_1.vectors", "2": "layer_2.vectors"}
    assert readout_problems(tmp_path) == []

    # A manifest that names a concept too many, and tensors that are not unit rows, are reported.
    manifest["concepts"].append("extra")
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert any("shape" in p for p in readout_problems(tmp_path))
    with pytest.raises(ValueError, match="invalid readout"):
        load_readout(tmp_path)
    bad = SteeringVectors(sv.concepts, sv.layers, {k: v * 2 for k, v in sv.vectors.items()}, sv.pair_counts)
    save_readout(bad, tmp_path / "bad")
    assert any("unit norm" in p for p in readout_problems(tmp_path / "bad"))
    assert readout_problems(tmp_path / "missing") != []


# --------------------------------------------------------------------------------------------
# The asset
# --------------------------------------------------------------------------------------------


def _nodes_for(pairs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(pairs with a node id per text, a memory_nodes table: kinds alternate journal/reflection, tags
    are the emotions a text is a positive for, scored 9)."""
    texts = list(dict.fromkeys(pairs["text"]))
    ids = {t: f"node-{i:03d}" for i, t in enumerate(texts)}
    positives = pairs[pairs["polarity"] == "positive"].groupby("text")["emotion"].apply(set).to_dict()
    nodes = pd.DataFrame(
        {
            "node_id": [ids[t] for t in texts],
            "kind": ["journal" if i % 3 else "reflection" for i in range(len(texts))],
            "text": texts,
            "tags_json": [
                json.dumps({e: 9 for e in sorted(positives.get(t, set()))} or {"neutral": 5}) for t in texts
            ],
            "n_tags": [len(positives.get(t, ())) for t in texts],
            "source_line": list(range(1, len(texts) + 1)),
        }
    )
    return pairs.assign(node_id=pairs["text"].map(ids)), nodes


def _seed_home(home, model, tok, pairs: pd.DataFrame, tables: dict[str, pd.DataFrame] | None = None) -> None:
    from carl_assets import storage
    from carl_assets.defs.resources import build_resources

    if "node_id" not in pairs.columns or "memory_nodes" not in (tables or {}):
        pairs, nodes = _nodes_for(pairs)
        tables = {"memory_nodes": nodes, **(tables or {})}

    with build_resources(home)["artifacts"].write_dir("base_model") as folder:
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
    storage.write_tables(storage.database_path(home), {"emotion_training_pairs": pairs, **(tables or {})})


def test_steering_asset_writes_readout_stats_and_passes_checks(tiny_model_and_tokenizer, groups, tmp_path):
    from carl_assets.defs.resources import build_resources
    from carl_assets.defs.steering import steering_vectors
    from carl_assets.defs.steering_checks import vectors_finite_unit_norm
    from tests.upstreams import with_upstreams

    model, tok = tiny_model_and_tokenizer
    rows = pd.DataFrame(_records({**groups, "rare": (groups["warmth"][0][:3], groups["warmth"][1][:3])}))
    _seed_home(tmp_path, model, tok, rows)
    run_config = {"ops": {"steering_vectors": {"config": {"min_pairs_per_polarity": 5, "layers": [1, 2]}}}}
    result = dg.materialize(
        with_upstreams(steering_vectors), resources=build_resources(tmp_path), run_config=run_config
    )
    assert result.success
    checks = result.get_asset_check_evaluations()
    assert len(checks) == 2 and all(c.passed for c in checks)
    meta = result.asset_materializations_for_node("steering_vectors")[0].metadata
    assert meta["concepts"].value == 3 and meta["skipped_emotions"].value == {
        "rare": {"positive": 3, "negative": 3}
    }
    assert "auc_by_layer" in meta and meta["token_reduction"].value == "mean"
    loaded = load_readout(build_resources(tmp_path)["artifacts"].require("steering_vectors"))
    assert loaded.concepts == ["clarity", "frustration", "warmth"] and loaded.layers == [1, 2]
    from carl_assets import storage

    stats = storage.read_table(storage.database_path(tmp_path), "steering_vector_stats")
    assert len(stats) == 6 and set(stats["emotion"]) == set(loaded.concepts)

    # A config change is a new data version (downstream goes stale); the same config is the same one.
    again = dg.materialize(
        with_upstreams(steering_vectors), resources=build_resources(tmp_path), run_config=run_config
    )
    other = {
        "ops": {
            "steering_vectors": {
                "config": {"min_pairs_per_polarity": 5, "layers": [1, 2], "reduction": "last"}
            }
        }
    }
    changed = dg.materialize(
        with_upstreams(steering_vectors), resources=build_resources(tmp_path), run_config=other
    )
    versions = [
        r.asset_materializations_for_node("steering_vectors")[0].metadata["data_version"].value
        for r in (result, again, changed)
    ]
    assert versions[0] == versions[1] != versions[2]

    # Corrupt the tensors: the unit-norm check fails.
    from safetensors.torch import load_file, save_file

    path = build_resources(tmp_path)["artifacts"].require("steering_vectors", "vectors.safetensors")
    tensors = {k: v * 3 for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path))
    check = vectors_finite_unit_norm(path.parent)
    assert not check.passed and check.metadata["max_abs_norm_error"].value > 1.0


@pytest.mark.slow
def test_default_graph_end_to_end(tmp_path):
    """memory_graph -> emotion_training_pairs -> base_model (short pretraining) -> steering_vectors."""
    from carl_assets.defs.memory import emotion_training_pairs, memory_graph
    from carl_assets.defs.models import base_model
    from carl_assets.defs.resources import build_resources
    from carl_assets.defs.steering import steering_vectors
    from tests.upstreams import with_upstreams

    run_config = {"ops": {"base_model": {"config": {"steps": 30}}}}
    result = dg.materialize(
        with_upstreams(memory_graph, emotion_training_pairs, base_model, steering_vectors),
        resources=build_resources(tmp_path),
        run_config=run_config,
    )
    assert result.success
    assert all(c.passed for c in result.get_asset_check_evaluations())
    loaded = load_readout(build_resources(tmp_path)["artifacts"].require("steering_vectors"))
    assert len(loaded.concepts) >= 12 and loaded.layers == [1, 2, 3, 4]
    assert loaded.vectors[4].shape == (len(loaded.concepts), 128)
