"""Emotion taggers (carl_assets.memory.tagging) and the emotion_tags asset."""

from __future__ import annotations

import copy
import json
import math

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import torch

from carl_assets.memory.taggers import lexicon
from carl_assets.memory.taggers.model import (
    SCORES,
    ScoreTokens,
    answer_probabilities,
    model_probabilities,
    prompt_ids,
    reduce_scores,
    score_tokens,
)
from carl_assets.memory.tagging import (
    DEFAULT_EMOTIONS,
    TAG_COLUMNS,
    emotion_vocabulary,
    node_status,
    nodes_with_tags,
    tag_counts,
    tag_nodes,
    tags_by_node,
)
from tests.upstreams import with_upstreams

# 25 words; of them only "adore" is in Empath's `love` category, and no word is in `pride`.
GARDEN = (
    "I adore the old garden. We walked along the path to the river and counted the boats, "
    "then went back to the house for supper."
)
LOVE_HEAVY = "I adore you, my love, with affection and devotion."


def _nodes(rows: list[tuple], stub: list[bool] | None = None) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["node_id", "text", "tags_json"])
    frame["kind"] = "note"
    if stub is not None:
        frame["is_stub"] = stub
    return frame


def test_lexicon_score_matches_hand_computation():
    # 1 hit in 25 words = 4 hits per 100 words; score = floor(4 * 10 / 5 + 0.5) = 8.
    assert lexicon.words(GARDEN)[:3] == ["i", "adore", "the"] and len(lexicon.words(GARDEN)) == 25
    rates, scored = lexicon.lexicon_rates([GARDEN], ["love", "pride", "clarity"])
    assert scored == ["love", "pride"]  # no Empath category covers clarity: not scored
    assert rates[0].tolist() == [4.0, 0.0]
    tags = tag_nodes(_nodes([("g", GARDEN, "{}")]), "lexicon", ["love", "pride", "clarity"])
    assert tags[TAG_COLUMNS].values.tolist() == [["g", "love", 8, "lexicon", 4.0]]
    assert [lexicon.rate_to_score(r) for r in (0.0, 0.24, 0.25, 2.0, 5.0, 40.0)] == [0, 0, 1, 4, 10, 10]


def test_lexicon_counts_agree_with_empath_itself():
    from empath import Empath

    text = "Frustrated and annoyed, then calm: I felt proud, grateful and a little lonely, tired, sleepy."
    counts = Empath().analyze(
        text, categories=["exasperation", "irritability", "pride", "sleep"], tokenizer=lexicon.words
    )
    rates, scored = lexicon.lexicon_rates([text], ["pride", "tiredness", "frustration"])
    n = len(lexicon.words(text))
    assert scored == ["pride", "tiredness", "frustration"]
    assert rates[0, 0] == pytest.approx(100 * counts["pride"] / n)
    assert rates[0, 1] == pytest.approx(100 * counts["sleep"] / n)
    # frustration maps to two categories; a word in both counts once
    both = {
        w
        for w in lexicon.words(text)
        if w in Empath().cats["exasperation"] or w in Empath().cats["irritability"]
    }
    assert rates[0, 2] == pytest.approx(100 * sum(w in both for w in lexicon.words(text)) / n)
    assert rates[0, 2] > 0


def test_lexicon_map_errors_name_the_bad_category():
    with pytest.raises(ValueError, match="not_a_category"):
        lexicon.lexicon_categories(["curiosity"], {"curiosity": ["not_a_category"]})
    assert lexicon.lexicon_categories(["curiosity"], {"curiosity": ["anticipation"]}) == {
        "curiosity": ("anticipation",)
    }


def test_user_tags_win_and_stub_or_empty_nodes_are_never_tagged():
    nodes = _nodes(
        [
            ("tagged", LOVE_HEAVY, json.dumps({"joy": 3})),  # the user's tag line: kept, nothing added
            ("untagged", LOVE_HEAVY, "{}"),
            ("stub", LOVE_HEAVY, "{}"),
            ("empty", "   ", "{}"),
            ("name only", "Mara (person)", "{}"),  # an entity without observations: its text is its name
        ],
        stub=[False, False, True, False, False],
    )
    nodes["n_observations"] = [2, 1, 0, 0, 0]
    tags = tag_nodes(nodes, "lexicon", ["love", "joy"])
    by_node = tags_by_node(tags)
    assert by_node["tagged"] == {"joy": 3}
    assert set(by_node) == {"tagged", "untagged"} and by_node["untagged"]["love"] == 10
    assert tags.loc[tags["node_id"] == "tagged", "source"].tolist() == ["user"]
    assert set(tags.loc[tags["node_id"] == "untagged", "source"]) == {"lexicon"}
    status = node_status(nodes, tags, "lexicon").set_index("node_id")["status"].to_dict()
    assert status == {
        "tagged": "user",
        "untagged": "tagged",
        "stub": "stub",
        "empty": "empty_text",
        "name only": "empty_text",
    }
    # off: user tags only; sources filter the per-node dicts
    assert tag_nodes(nodes, "off")[TAG_COLUMNS].values.tolist() == [["tagged", "joy", 3, "user", 3.0]]
    assert tags_by_node(tags, ["user"]) == {"tagged": {"joy": 3}}
    rebuilt = nodes_with_tags(nodes, tags, ["lexicon"]).set_index("node_id")
    assert rebuilt.loc["tagged", "tags_json"] == "{}" and rebuilt.loc["untagged", "n_tags"] == 2
    assert json.loads(rebuilt.loc["untagged", "tags_json"]) == by_node["untagged"]
    counts = tag_counts(tags).set_index("emotion")
    assert counts.loc["love", "lexicon"] == 1 and counts.loc["joy", "user"] == 1


def test_min_score_and_none_found():
    nodes = _nodes([("g", GARDEN, "{}"), ("plain", "We moved the weekly sync to Thursday.", "{}")])
    assert tag_nodes(nodes, "lexicon", ["love"], min_score=9).empty
    tags = tag_nodes(nodes, "lexicon", ["love"])
    assert tags["node_id"].tolist() == ["g"]
    assert node_status(nodes, tags, "lexicon")["status"].tolist() == ["tagged", "none_found"]
    with pytest.raises(ValueError, match="min_score"):
        tag_nodes(nodes, "lexicon", min_score=11)
    with pytest.raises(ValueError, match="tagger must be one of"):
        tag_nodes(nodes, "vibes")
    with pytest.raises(ValueError, match="needs a model"):
        tag_nodes(nodes, "model")


def test_emotion_vocabulary_defaults():
    tagged = _nodes([("a", "x", json.dumps({"joy": 9, "calm": 2})), ("b", "y", json.dumps({"joy": 4}))])
    assert emotion_vocabulary(tagged) == ["joy", "calm"]  # most used first
    assert emotion_vocabulary(_nodes([("a", "x", "{}")])) == DEFAULT_EMOTIONS
    assert emotion_vocabulary(tagged, ["awe", "awe"]) == ["awe"]
    with pytest.raises(ValueError, match="Self-Doubt"):
        emotion_vocabulary(tagged, ["Self-Doubt"])


def test_two_token_answers_share_the_prefix_mass():
    # Vocabulary of 4: answers 0..9 are impossible here except "1" (token 1) and "10" (tokens 1, 0).
    ids = [(100 + s,) for s in range(10)]
    ids[1] = (1,)
    tokens = ScoreTokens(ids + [(1, 0)])
    first = torch.full((1, 110), -1e9)
    first[0, 1], first[0, 100] = math.log(0.6), math.log(0.4)  # P("1") = 0.6, P("0") = 0.4
    second = {1: torch.log(torch.tensor([[0.25, 0.75] + [1e-12] * 108]))}  # P("0" | "1") = 0.25
    probs = answer_probabilities(first, second, tokens)[0]
    assert probs[0] == pytest.approx(0.4) and probs[1] == pytest.approx(0.6 * 0.75)
    assert probs[10] == pytest.approx(0.6 * 0.25) and probs.sum() == pytest.approx(1.0)
    score, raw = reduce_scores(probs[None, :], "expected")
    assert raw[0] == pytest.approx(0.45 + 1.5) and score[0] == 2
    assert reduce_scores(probs[None, :], "argmax")[0][0] == 1


def _hand_probabilities(model, tokenizer, text: str, emotion: str) -> np.ndarray:
    """Unbatched, no KV cache: softmax of the logits at the answer position, two-token answers by a
    second full forward on prompt + first token."""
    tokens = score_tokens(tokenizer)
    prompt = prompt_ids(tokenizer, text, emotion)
    assert tokenizer.decode(prompt).endswith(
        f"express {emotion}? Answer with one number from 0 to 10."
        + ("<|eos|><|assistant|>\n" if tokenizer.chat_template else "\nRating (0-10): ")
    )

    def next_probs(ids):
        with torch.no_grad():
            return torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].double(), dim=-1)

    p1 = next_probs(prompt)
    mass = []
    for ids in tokens.ids:
        if len(ids) == 2:
            mass.append(float(p1[ids[0]] * next_probs(prompt + [ids[0]])[ids[1]]))
        else:
            longer = [o[1] for o in tokens.ids if len(o) == 2 and o[0] == ids[0]]
            rest = 1 - float(next_probs(prompt + [ids[0]])[longer].sum()) if longer else 1.0
            mass.append(float(p1[ids[0]]) * rest)
    return np.array(mass) / sum(mass)


@pytest.mark.parametrize("chat", [True, False])
def test_model_tagger_matches_a_hand_computation(tiny_model_and_tokenizer, chat):
    model, tokenizer = tiny_model_and_tokenizer
    if not chat:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.chat_template = None
    texts = [
        "I felt the quiet morning.",
        "We laughed at the warm kitchen and it was good. Later the deadline.",
    ]
    probs = model_probabilities(model, tokenizer, texts, ["joy", "warmth"], batch_size=3, max_text_tokens=256)
    assert probs.shape == (2, 2, len(SCORES))
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-9)
    hand = _hand_probabilities(model, tokenizer, texts[0], "warmth")
    np.testing.assert_allclose(probs[0, 1], hand, atol=1e-5)  # batched + left-padded = unbatched
    expected = float(np.dot(SCORES, hand))
    nodes = _nodes([("a", texts[0], "{}"), ("b", texts[1], "{}")])
    tags = tag_nodes(nodes, "model", ["joy", "warmth"], min_score=0, model=model, tokenizer=tokenizer)
    row = tags[(tags["node_id"] == "a") & (tags["emotion"] == "warmth")].iloc[0]
    assert row["source"] == "model" and row["raw_score"] == pytest.approx(expected, abs=1e-4)
    assert row["score"] == math.floor(expected + 0.5) and len(tags) == 4


def _write_nodes(home, nodes: pd.DataFrame) -> None:
    from carl_assets import storage

    full = nodes.assign(n_tags=0, source_line=range(1, len(nodes) + 1))
    storage.write_tables(storage.database_path(home), {"memory_nodes": full})


@pytest.mark.slow  # three materializations
def test_asset_tags_an_untagged_graph_and_versions_follow_config(tmp_path):
    from carl_assets import storage
    from carl_assets.defs.emotion_tags import emotion_tags
    from carl_assets.defs.resources import build_resources

    _write_nodes(tmp_path, _nodes([("g", GARDEN, "{}"), ("h", LOVE_HEAVY, "{}"), ("s", "", "{}")]))

    def run(config):
        result = dg.materialize(
            with_upstreams(emotion_tags),
            resources=build_resources(tmp_path),
            run_config={"ops": {"emotion_tags": {"config": config}}},
        )
        assert result.success
        return result.asset_materializations_for_node("emotion_tags")[0].metadata

    meta = run({"emotions": ["love", "clarity"]})
    table = storage.read_table(storage.database_path(tmp_path), "emotion_tags")
    assert table[["node_id", "emotion", "score", "source"]].values.tolist() == [
        ["g", "love", 8, "lexicon"],
        ["h", "love", 10, "lexicon"],
    ]
    nodes = storage.read_table(storage.database_path(tmp_path), "emotion_tag_nodes")
    assert nodes["status"].tolist() == ["tagged", "tagged", "empty_text"]
    assert meta["dagster/row_count"].value == 2 and meta["rows_by_source"].value == {"lexicon": 2}
    assert meta["uncovered_emotions"].value == ["clarity"]
    again = run({"emotions": ["love", "clarity"]})
    off = run({"emotions": ["love", "clarity"], "tagger": "off"})
    versions = [m["data_version"].value for m in (meta, again, off)]
    assert versions[0] == versions[1] != versions[2]
    assert storage.read_table(storage.database_path(tmp_path), "emotion_tags").empty


def test_asset_model_tagger_reads_base_model(tiny_model_and_tokenizer, tmp_path):
    from carl_assets import storage
    from carl_assets.defs.emotion_tags import emotion_tags
    from carl_assets.defs.resources import build_resources

    model, tokenizer = tiny_model_and_tokenizer
    with build_resources(tmp_path)["artifacts"].write_dir("base_model") as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    _write_nodes(
        tmp_path,
        _nodes(
            [
                ("a", "I felt the quiet morning.", json.dumps({"calm": 7})),
                ("b", "The team argued over the deadline.", "{}"),
            ]
        ),
    )
    result = dg.materialize(
        with_upstreams(emotion_tags),
        resources=build_resources(tmp_path),
        run_config={
            "ops": {"emotion_tags": {"config": {"tagger": "model", "min_score": 0, "device": "cpu"}}}
        },
    )
    assert result.success
    table = storage.read_table(storage.database_path(tmp_path), "emotion_tags")
    assert table[["node_id", "emotion", "source"]].values.tolist() == [
        ["a", "calm", "user"],
        ["b", "calm", "model"],
    ]
    assert 0 <= int(table["score"].iloc[1]) <= 10
