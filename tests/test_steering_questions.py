"""The amygdala reference's open questions, measured: layer selection (`auto`), BOS left out of the mean,
cross-talk, generalisation to an unseen node kind and to a user's text file, emotion selection, low-score
negatives, the [E, L, H] view, and texts longer than the model's positions."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from carl_assets.steering import (
    ReadoutConfig,
    ResidualReader,
    load_readout,
    save_readout,
    train_steering_vectors,
)
from carl_assets.steering.crosstalk import cosine_matrix, cross_talk, tag_cooccurrence
from carl_assets.steering.layers import subsample_pairs, sweep_layers
from carl_assets.steering.projection import project_texts, read_text_file
from carl_assets.steering.selection import select_emotions


def _rows(emotion: str, pos: list[str], neg: list[str], kind: str | None = None) -> list[dict[str, str]]:
    rows = [{"emotion": emotion, "polarity": "positive", "text": t} for t in pos]
    rows += [{"emotion": emotion, "polarity": "negative", "text": t} for t in neg]
    return [{**r, "kind": kind} for r in rows] if kind else rows


# --------------------------------------------------------------------------------------------
# Layer selection: a model where exactly one layer carries the signal
# --------------------------------------------------------------------------------------------

WORDS = [f"w{i}" for i in range(24)]
MARKER, TWIN = "marker", "twin"


class WordTokenizer:
    """Whitespace words to ids (0 = pad); enough of a tokenizer for `train_steering_vectors`."""

    pad_token_id, bos_token_id = 0, None

    def __init__(self) -> None:
        self.vocab = {w: i + 1 for i, w in enumerate([*WORDS, MARKER, TWIN])}

    def __call__(self, texts, add_special_tokens=True, verbose=False):
        return {"input_ids": [[self.vocab[w] for w in t.split()] for t in texts]}


class Block(torch.nn.Module):
    """x + 0.5 tanh(x W); the planted block adds `alpha * u` at marker tokens, the next one removes it
    before computing, so only the planted layer's residual differs between marker and twin texts."""

    def __init__(
        self, hidden: int, generator: torch.Generator, add: torch.Tensor | None, remove: torch.Tensor | None
    ):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(hidden, hidden, generator=generator) / hidden**0.5)
        self.add, self.remove = add, remove

    def forward(self, x: torch.Tensor, flag: torch.Tensor) -> torch.Tensor:
        if self.remove is not None:
            x = x - flag * self.remove
        y = x + 0.5 * torch.tanh(x @ self.weight)
        return y + flag * self.add if self.add is not None else y


class PlantedModel(torch.nn.Module):
    def __init__(self, vocab: dict[str, int], n_blocks: int, planted_layer: int, hidden: int = 16):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.config = SimpleNamespace(hidden_size=hidden, num_hidden_layers=n_blocks)
        self.embed = torch.nn.Embedding(len(vocab) + 1, hidden)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(len(vocab) + 1, hidden, generator=g))
            self.embed.weight[vocab[MARKER]] = self.embed.weight[vocab[TWIN]]  # indistinguishable tokens
        self.marker = vocab[MARKER]
        signal = 3.0 * torch.randn(hidden, generator=g)
        self.layers = torch.nn.ModuleList(
            Block(
                hidden, g, signal if i == planted_layer - 1 else None, signal if i == planted_layer else None
            )
            for i in range(n_blocks)
        )

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.embed

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        x, flag = self.embed(input_ids), (input_ids == self.marker).float()[..., None]
        for block in self.layers:
            x = block(x, flag)
        return x


def _planted_pairs(n: int = 60, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)

    def text(word: str) -> str:
        words = list(rng.choice(WORDS, size=int(rng.integers(4, 9))))
        words.insert(int(rng.integers(0, len(words))), word)
        return " ".join(words)

    rows = []
    for emotion in ("joy", "grief"):
        rows += _rows(emotion, [text(MARKER) for _ in range(n)], [text(TWIN) for _ in range(n)])
    return pd.DataFrame(rows)


@pytest.mark.parametrize("planted", [2, 4])
def test_layer_auto_picks_the_planted_layer(planted):
    tok = WordTokenizer()
    model = PlantedModel(tok.vocab, n_blocks=5, planted_layer=planted).eval()
    sweep = sweep_layers(
        model, tok, _planted_pairs(), ReadoutConfig(reduction="mean"), k=1, max_per_group=40, max_texts=512
    )
    assert sweep.swept == [1, 2, 3, 4, 5] and sweep.chosen == [planted]
    auc = sweep.by_layer.set_index("layer")["mean_auc"]
    assert auc[planted] == pytest.approx(1.0)
    assert (auc.drop(planted) < 0.8).all()  # marker and twin read the same elsewhere: chance level
    assert sweep.subsample_texts <= 160 and sweep.subsample_pairs == 160
    # k=3 keeps the planted layer among the three best, in index order
    assert planted in sweep_layers(model, tok, _planted_pairs(), k=3, max_per_group=40, max_texts=512).chosen


def test_sweep_activations_are_reused_exactly(tiny_model_and_tokenizer, tiny_texts):
    model, tok = tiny_model_and_tokenizer
    pairs = pd.DataFrame(
        _rows("warmth", [t + " warm kitchen" for t in tiny_texts[:30]], tiny_texts[30:60])
        + _rows("calm", tiny_texts[10:40], tiny_texts[50:80])
    )
    sweep = sweep_layers(
        model, tok, pairs, ReadoutConfig(reduction="mean"), k=2, max_per_group=12, max_texts=512
    )
    plain = train_steering_vectors(model, tok, pairs, layers=[1, 2], reduction="mean")
    reused = train_steering_vectors(
        model, tok, pairs, layers=[1, 2], reduction="mean", precomputed=sweep.precomputed([1, 2])
    )
    for layer in (1, 2):
        assert torch.allclose(plain.vectors[layer], reused.vectors[layer], atol=1e-6)
    with pytest.raises(ValueError, match="not swept"):
        sweep.precomputed([0])


def test_subsample_shares_texts_across_emotions():
    texts = [f"text {i}" for i in range(100)]
    pairs = pd.DataFrame(
        _rows("a", texts[:50], texts[50:]) + _rows("b", texts[25:75], texts[75:] + texts[:25])
    )
    sample = subsample_pairs(pairs, 10, seed=0)
    assert sample.groupby(["emotion", "polarity"]).size().tolist() == [10, 10, 10, 10]
    # a shared ranking: the emotions' picks overlap, so fewer than 40 unique texts
    assert sample["text"].nunique() < 40
    assert sample["text"].nunique() <= subsample_pairs(pairs, 10, seed=0, max_texts=15)["text"].nunique() * 3
    assert subsample_pairs(pairs, 10, seed=0, max_texts=15)["text"].nunique() <= 15
    with pytest.raises(ValueError, match="max_per_group"):
        subsample_pairs(pairs, 1)


# --------------------------------------------------------------------------------------------
# BOS left out of the mean reduction
# --------------------------------------------------------------------------------------------


class BosTokenizer:
    """The tiny tokenizer with a BOS prepended, as Llama-style tokenizers do."""

    def __init__(self, tok):
        self.tok, self.pad_token_id, self.bos_token_id = tok, tok.pad_token_id, tok.bos_token_id

    def __call__(self, texts, **kwargs):
        return {"input_ids": [[self.bos_token_id, *ids] for ids in self.tok(list(texts))["input_ids"]]}


def test_bos_is_left_out_of_the_mean(tiny_model_and_tokenizer, tiny_texts):
    model, tok = tiny_model_and_tokenizer
    bos = tok.bos_token_id
    texts = [tiny_texts[0], "a quiet morning"]
    ids = [[bos, *tok(t)["input_ids"]] for t in texts]
    width = max(map(len, ids))
    for side in ("right", "left"):
        input_ids = torch.full((2, width), tok.pad_token_id)
        mask = torch.zeros((2, width), dtype=torch.long)
        for row, seq in enumerate(ids):
            span = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
            input_ids[row, span], mask[row, span] = torch.as_tensor(seq), 1
        without = ResidualReader(model, [1], "mean", skip_leading_token_id=bos)(input_ids, mask)
        with_bos = ResidualReader(model, [1], "mean")(input_ids, mask)
        for row, seq in enumerate(ids):
            with torch.inference_mode():
                alone = model(torch.as_tensor([seq]), output_hidden_states=True).hidden_states[1][0]
            # the BOS still sits in the context; only the average skips its position
            assert torch.allclose(without[row, 0], alone[1:].mean(dim=0), atol=1e-5)
            assert torch.allclose(with_bos[row, 0], alone.mean(dim=0), atol=1e-5)
            assert not torch.allclose(without[row, 0], with_bos[row, 0], atol=1e-4)
    # `last` is untouched by the rule; a text that is only the BOS has nothing left to average
    last = ResidualReader(model, [1], "last", skip_leading_token_id=bos)(input_ids, mask)
    assert torch.allclose(last, ResidualReader(model, [1], "last")(input_ids, mask))
    with pytest.raises(ValueError, match="BOS token alone"):
        ResidualReader(model, [1], "mean", skip_leading_token_id=bos)(
            torch.tensor([[bos]]), torch.tensor([[1]])
        )

    # Training with a BOS-adding tokenizer: the vectors match training on the same texts without BOS
    # ids only up to the context the BOS adds, and the manifest says what was done.
    rows = _rows("warmth", [t + " warm kitchen" for t in tiny_texts[:20]], tiny_texts[20:40])
    skip = train_steering_vectors(model, BosTokenizer(tok), rows, layers=[1], reduction="mean")
    keep = train_steering_vectors(
        model, BosTokenizer(tok), rows, layers=[1], reduction="mean", exclude_bos=False
    )
    assert skip.bos_excluded and not keep.bos_excluded
    assert "BOS" in skip.manifest()["token_reduction_detail"]
    assert float(torch.dot(skip.vectors[1][0], keep.vectors[1][0])) < 1 - 1e-4  # a different direction


# --------------------------------------------------------------------------------------------
# Cross-talk
# --------------------------------------------------------------------------------------------


def test_cross_talk_matrix_and_cooccurrence(tiny_model_and_tokenizer, tiny_texts):
    model, tok = tiny_model_and_tokenizer
    warm = [t + " warm kitchen warm" for t in tiny_texts[:30]]
    rows = (
        _rows("warmth", warm, tiny_texts[40:70])
        + _rows("love", warm[:25] + tiny_texts[30:35], tiny_texts[45:75])
        + _rows("anger", [t + " broken build angry" for t in tiny_texts[60:90]], tiny_texts[:30])
    )
    sv = train_steering_vectors(model, tok, rows, layers=[1, 2], reduction="mean")
    for layer in sv.layers:
        cos = cosine_matrix(sv, layer)
        assert cos.shape == (3, 3) and np.array_equal(cos, cos.T) and np.allclose(np.diag(cos), 1.0)
        assert np.abs(cos).max() <= 1.0
    # co-occurring emotions (shared positives) get close vectors; an unrelated one does not
    concepts = sv.concepts  # anger, love, warmth
    cos = cosine_matrix(sv, 2)
    assert cos[concepts.index("love"), concepts.index("warmth")] > 0.9
    assert cos[concepts.index("anger"), concepts.index("warmth")] < 0.5

    tags = (
        [{"warmth": 9, "love": 9}] * 6
        + [{"warmth": 9}] * 2
        + [{"anger": 9}] * 4
        + [{"love": 2}] * 4
        + [{}] * 5
    )
    co = tag_cooccurrence(tags, concepts, 8)
    # phi by hand for love vs warmth over the 16 tagged nodes: love 6, warmth 8, both 6
    p_l, p_w, p_lw = 6 / 16, 8 / 16, 6 / 16
    expected = (p_lw - p_l * p_w) / np.sqrt(p_l * (1 - p_l) * p_w * (1 - p_w))
    assert co[concepts.index("love"), concepts.index("warmth")] == pytest.approx(expected, rel=1e-9)
    assert np.array_equal(co, co.T) and np.allclose(np.diag(co), 1.0)

    table, relation = cross_talk(sv, tags, 8)
    assert len(table) == 2 * 3 and set(relation["layer"]) == {1, 2}
    assert (relation["most_similar"] == "love+warmth").all()
    # the relation is the rank correlation over the pairs a < b (here positive: the co-occurring pair
    # is the closest)
    for layer, group in table.groupby("layer"):
        expected = group["cosine"].rank().corr(group["cooccurrence"].rank())
        got = relation.set_index("layer").loc[layer, "spearman_cosine_vs_cooccurrence"]
        assert got == pytest.approx(expected, rel=1e-9) and got > 0


# --------------------------------------------------------------------------------------------
# Generalisation: a node kind never trained on, and a user's text file
# --------------------------------------------------------------------------------------------


def test_transfer_auc_on_an_unseen_kind(tiny_model_and_tokenizer, tiny_texts):
    model, tok = tiny_model_and_tokenizer
    marked = [t + " warm kitchen warm" for t in tiny_texts]
    journal = _rows("warmth", marked[:30], tiny_texts[30:60], kind="journal")
    same = _rows("warmth", marked[60:80], tiny_texts[80:96], kind="reflection")
    sv = train_steering_vectors(
        model, tok, journal + same, layers=[1, 2], reduction="mean", transfer=("journal", "reflection")
    )
    stats = sv.stats.set_index("layer")
    assert (stats["transfer_auc"] > 0.9).all()
    assert (stats["n_transfer_train_positive"] == 30).all() and (
        stats["n_transfer_test_positive"] == 20
    ).all()
    assert (stats["n_transfer_test_negative"] == 16).all()
    # reflections where the marker means the opposite: the journal direction ranks them backwards
    flipped = _rows("warmth", tiny_texts[60:80], marked[80:96], kind="reflection")
    sv = train_steering_vectors(
        model, tok, journal + flipped, layers=[1, 2], reduction="mean", transfer=("journal", "reflection")
    )
    assert (sv.stats["transfer_auc"] < 0.15).all()
    # the cap on test texts, and the kinds' validation
    capped = train_steering_vectors(
        model,
        tok,
        journal + same,
        layers=[1],
        reduction="mean",
        transfer=("journal", "reflection"),
        max_transfer_texts=10,
    )
    assert int(capped.stats[["n_transfer_test_positive", "n_transfer_test_negative"]].sum(axis=1)[0]) == 10
    with pytest.raises(ValueError, match="kind"):
        train_steering_vectors(
            model,
            tok,
            _rows("warmth", marked[:5], tiny_texts[5:10]),
            layers=[1],
            transfer=("journal", "reflection"),
        )
    with pytest.raises(ValueError, match="two different kinds"):
        train_steering_vectors(model, tok, journal, layers=[1], transfer=("journal", "journal"))


def test_projections_of_a_text_file(tiny_model_and_tokenizer, tiny_texts, tmp_path):
    model, tok = tiny_model_and_tokenizer
    pos = [t + " warm kitchen warm" for t in tiny_texts[:30]]
    sv = train_steering_vectors(
        model, tok, _rows("warmth", pos, tiny_texts[30:60]), layers=[1, 2], reduction="mean"
    )
    path = tmp_path / "held_out.txt"
    path.write_text("\n".join(pos) + "\n\n   \n" + "\n".join(tiny_texts[30:60]) + "\n")
    texts = read_text_file(path)
    assert len(texts) == 60
    frame = project_texts(model, tok, sv, texts, ReadoutConfig())
    assert len(frame) == 60 * 1 * 2 and list(frame.columns[:3]) == ["text_index", "text", "emotion"]
    by_side = frame.assign(side=np.where(frame["text_index"] < 30, "pos", "neg")).groupby(["side", "layer"])
    calibrated = by_side["calibrated"].mean()
    # the training texts themselves: their mean calibrated projection is 1 (positives) and 0 (negatives)
    for layer in (1, 2):
        assert calibrated[("pos", layer)] == pytest.approx(1.0, rel=1e-4)
        assert calibrated[("neg", layer)] == pytest.approx(0.0, abs=1e-4)
    # the raw projection is the residual dotted with the unit vector
    reader = ResidualReader(model, [2], "mean")
    enc = tok([texts[0]], return_tensors="pt")
    expected = float(reader(enc["input_ids"], enc["attention_mask"])[0, 0] @ sv.vectors[2][0])
    got = frame[(frame.text_index == 0) & (frame.layer == 2)]["projection"].item()
    assert got == pytest.approx(expected, rel=1e-5)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="no non-empty lines"):
        read_text_file(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_text_file(tmp_path / "missing.txt")


# --------------------------------------------------------------------------------------------
# Emotion selection and negatives
# --------------------------------------------------------------------------------------------


def test_emotion_selection_top_n_and_curated():
    counts = {"warmth": 50, "love": 40, "anger": 40, "awe": 3, "grief": 12}
    assert select_emotions(counts) == (sorted(counts), {e: "all" for e in sorted(counts)}, [])
    selected, why, missing = select_emotions(counts, top_n=2)
    assert selected == ["anger", "warmth"] and why == {"anger": "top_n", "warmth": "top_n"}  # tie by name
    selected, why, missing = select_emotions(counts, top_n=1, curated=["Awe", "grief", "wonder"])
    assert selected == ["awe", "grief", "warmth"] and missing == ["wonder"]
    assert why == {"awe": "curated", "grief": "curated", "warmth": "top_n"}
    assert select_emotions(counts, top_n=1, curated=["warmth"])[1] == {"warmth": "top_n+curated"}
    with pytest.raises(ValueError, match="plain-word"):
        select_emotions(counts, curated=["warm th!"])
    with pytest.raises(ValueError, match="top_n"):
        select_emotions(counts, top_n=-1)


def test_low_score_negatives():
    from carl_assets.memory.graph import extract_training_pairs, graph_from_records

    body = "a long enough entry about the day and what happened in it, "
    records = [
        {"type": "entity", "name": "n1", "entityType": "journal", "observations": [body + "one", "warmth:9"]},
        {
            "type": "entity",
            "name": "n2",
            "entityType": "journal",
            "observations": [body + "two", "warmth:2 calm:5"],
        },
        {"type": "entity", "name": "n3", "entityType": "journal", "observations": [body + "three", "calm:8"]},
        {
            "type": "entity",
            "name": "n4",
            "entityType": "journal",
            "observations": [body + "four", "warmth:5"],
        },
    ]
    graph = graph_from_records(((i, r, json.dumps(r)) for i, r in enumerate(records, 1)), "test")

    def negatives(**kw) -> list[str]:
        pairs = extract_training_pairs(graph, **kw)
        return sorted(pairs[(pairs.emotion == "warmth") & (pairs.polarity == "negative")]["node_id"])

    assert negatives() == ["n3"]  # absent only (the default)
    assert negatives(max_negative_score=2) == ["n2", "n3"]  # absent or scored <= 2
    assert negatives(max_negative_score=5) == ["n2", "n3", "n4"]
    with pytest.raises(ValueError, match="max_negative_score"):
        extract_training_pairs(graph, max_negative_score=8)


# --------------------------------------------------------------------------------------------
# The readout's [E, L, H] view and the vLLM env vars; texts longer than the model's positions
# --------------------------------------------------------------------------------------------


def test_elh_view_and_vllm_env(tiny_model_and_tokenizer, tiny_texts, tmp_path):
    model, tok = tiny_model_and_tokenizer
    rows = _rows("warmth", tiny_texts[:10], tiny_texts[10:20]) + _rows(
        "calm", tiny_texts[20:30], tiny_texts[:10]
    )
    sv = train_steering_vectors(model, tok, rows, layers=[2, 1], reduction="last")
    save_readout(sv, tmp_path)
    elh = load_readout(tmp_path, layout="ELH")
    assert elh.shape == (2, 2, 32) and torch.equal(elh, sv.as_tensor())
    assert torch.equal(elh[sv.concepts.index("warmth"), 1], sv.vectors[2][sv.concepts.index("warmth")])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["vllm_env"] == {
        "VLLM_READOUT_VECTORS": "vectors.safetensors",
        "VLLM_READOUT_MANIFEST": "manifest.json",
    }
    assert all((tmp_path / name).is_file() for name in manifest["vllm_env"].values())
    with pytest.raises(ValueError, match="layout"):
        load_readout(tmp_path, layout="LEH")


def test_texts_longer_than_gpt2_positions_are_truncated_and_counted(
    tiny_model_and_tokenizer, tiny_texts, tmp_path
):
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    _, llama_tok = tiny_model_and_tokenizer
    # A GPT-2-style tokenizer: no pad token (and no BOS added)
    tok = PreTrainedTokenizerFast(tokenizer_object=llama_tok.backend_tokenizer, eos_token="<|eos|>")
    assert tok.pad_token_id is None
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(llama_tok), n_embd=32, n_layer=2, n_head=2, n_positions=12)
    ).eval()
    lengths = [len(tok(t)["input_ids"]) for t in dict.fromkeys(tiny_texts[:40])]  # unique texts
    long_texts = sum(n > 12 for n in lengths)
    assert 0 < long_texts < len(lengths)
    rows = _rows("warmth", tiny_texts[:20], tiny_texts[20:40])
    sv = train_steering_vectors(gpt2, tok, rows, layers=[1, 2], reduction="mean")  # no IndexError
    assert sv.truncated_texts == long_texts and sv.max_tokens == 12
    # the same as training on the first 12 tokens of each text
    cut = [{**r, "text": tok.decode(tok(r["text"])["input_ids"][:12])} for r in rows]
    ref = train_steering_vectors(gpt2, tok, cut, layers=[1, 2], reduction="mean")
    for layer in (1, 2):
        assert torch.allclose(sv.vectors[layer], ref.vectors[layer], atol=1e-5)
    # max_length below the model's positions wins; the manifest reports the count
    shorter = train_steering_vectors(gpt2, tok, rows, layers=[1], reduction="last", max_length=6)
    assert shorter.max_tokens == 6 and shorter.truncated_texts == sum(n > 6 for n in lengths)
    save_readout(sv, tmp_path)
    assert json.loads((tmp_path / "manifest.json").read_text())["truncated_texts"] == long_texts
    with pytest.raises(ValueError, match="max_length"):
        train_steering_vectors(gpt2, tok, rows, layers=[1], max_length=0)


# --------------------------------------------------------------------------------------------
# The asset: auto layers, selection, transfer, cross-talk and projections in tables and metadata
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_asset_answers_the_open_questions(tiny_model_and_tokenizer, tiny_texts, tmp_path):
    import dagster as dg
    from test_steering import _seed_home

    from carl_assets import storage
    from carl_assets.defs.resources import build_resources
    from carl_assets.defs.steering import steering_vectors
    from tests.upstreams import with_upstreams

    model, tok = tiny_model_and_tokenizer
    marked = [t + " warm kitchen warm" for t in tiny_texts]
    pairs = pd.DataFrame(
        _rows("warmth", marked[:40], tiny_texts[40:80])
        + _rows("love", marked[:30], tiny_texts[50:80])
        + _rows("anger", tiny_texts[60:75], tiny_texts[:15])
        + _rows("awe", tiny_texts[:11], tiny_texts[80:91])
    )
    _seed_home(tmp_path, model, tok, pairs)
    held = tmp_path / "conversation.txt"
    held.write_text("the warm kitchen warm and a quiet morning\nthe broken build, again\n")
    config = {
        "layer_selection": "auto",
        "auto_k": 1,
        "min_pairs_per_polarity": 10,
        "top_n_emotions": 2,
        "emotions": ["awe", "wonder"],
        "heldout_text_file": str(held),
        "sweep_max_per_group": 16,
    }
    result = dg.materialize(
        with_upstreams(steering_vectors),
        resources=build_resources(tmp_path),
        run_config={"ops": {"steering_vectors": {"config": config}}},
    )
    assert result.success
    meta = {
        k: v.value for k, v in result.asset_materializations_for_node("steering_vectors")[0].metadata.items()
    }
    # top 2 by positives (warmth 40, love 30) plus the curated awe; wonder is not in the data
    assert meta["concepts"] == 3 and meta["emotion_selection"]["missing_curated"] == ["wonder"]
    assert meta["emotion_selection"]["not_selected"] == ["anger"]
    db = storage.database_path(tmp_path)
    sweep = storage.read_table(db, "steering_layer_sweep")
    assert sorted(sweep["layer"]) == [1, 2] and int(sweep["chosen"].sum()) == 1
    assert meta["layers"] == [int(sweep.loc[sweep["rank"] == 1, "layer"].item())]
    cross = storage.read_table(db, "steering_cross_talk")
    assert len(cross) == 3 and cross["cosine"].between(-1, 1).all()
    stats = storage.read_table(db, "steering_vector_stats")
    assert stats["transfer_auc"].notna().all() and meta["transfer"] == "journal -> reflection"
    projections = storage.read_table(db, "steering_heldout_projections")
    assert len(projections) == 2 * 3 and meta["heldout_texts"] == 2
    for plot in ("auc_vs_depth", "cross_talk", "auc_by_layer"):
        assert meta[plot].startswith(f"![{plot}](data:image/png;base64,")
    assert "VLLM_READOUT_VECTORS=" in meta["vllm_env"]
