"""The serving-time readout: projections equal a hand computation, calibration survives a save/load, and
`carl readout --text` prints them."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from carl_assets import cli
from carl_assets.steering import SteeringVectors, load_readout, save_readout
from carl_assets.steering.readout import SERVING_READ, readout_projections

TEXTS = ["I felt the warm kitchen and it was good.", "The deadline made me angry."]


def random_readout(hidden: int, layer: int, concepts=("warmth", "anger")) -> SteeringVectors:
    generator = torch.Generator().manual_seed(3)
    rows = torch.randn(len(concepts), hidden, generator=generator, dtype=torch.float32)
    rows = rows / rows.norm(dim=-1, keepdim=True)
    stats = pd.DataFrame(
        [
            {
                "emotion": c,
                "layer": layer,
                "mean_projection_positive": 0.5 + i,
                "mean_projection_negative": -0.25 * (i + 1),
            }
            for i, c in enumerate(concepts)
        ]
    )
    return SteeringVectors(
        concepts=list(concepts),
        layers=[layer],
        vectors={layer: rows},
        reduction="mean",
        stats=stats,
        model="tiny",
        bos_excluded=True,
    )


def by_hand(model, tokenizer, text: str, vector: torch.Tensor, layer: int) -> float:
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[layer][0].double()  # [T, H]
    if tokenizer.bos_token_id is not None and int(ids[0, 0]) == tokenizer.bos_token_id:
        hidden = hidden[1:]  # the readout leaves a leading BOS out of the mean
    return float(hidden.mean(dim=0) @ vector.double())


def test_projections_equal_a_hand_computation_and_calibrate(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    layer = 1  # after block 0, before the final norm (hidden_states[1] of a 2-block model)
    vectors = random_readout(model.config.hidden_size, layer)
    frame = readout_projections(model, tokenizer, TEXTS, vectors, SERVING_READ)
    assert len(frame) == len(TEXTS) * 2
    for row in frame.itertuples(index=False):
        expected = by_hand(
            model,
            tokenizer,
            TEXTS[row.text_index],
            vectors.vectors[layer][vectors.concepts.index(row.emotion)],
            layer,
        )
        assert row.projection == pytest.approx(expected, rel=1e-4, abs=1e-6)
        stats = vectors.stats.set_index("emotion").loc[row.emotion]
        span = stats.mean_projection_positive - stats.mean_projection_negative
        assert row.calibrated == pytest.approx(
            (row.projection - stats.mean_projection_negative) / span, rel=1e-9
        )


def test_calibration_survives_save_and_load_and_the_cli_prints_it(tiny_model_and_tokenizer, tmp_path, capsys):
    model, tokenizer = tiny_model_and_tokenizer
    vectors = random_readout(model.config.hidden_size, 1)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    vectors.model = str(model_dir)
    save_readout(vectors, tmp_path / "readout")
    loaded = load_readout(tmp_path / "readout")
    pd.testing.assert_frame_equal(
        loaded.stats.reset_index(drop=True),
        vectors.stats[loaded.stats.columns].reset_index(drop=True),
        check_dtype=False,
    )
    direct = readout_projections(model, tokenizer, TEXTS[:1], vectors, SERVING_READ)
    assert cli.main(["readout", "--vectors", str(tmp_path / "readout"), "--text", TEXTS[0]]) == 0
    out = capsys.readouterr().out
    top = direct.sort_values("calibrated", ascending=False).iloc[0]
    first_line = out.splitlines()[1]
    assert first_line.split()[0] == top.emotion and f"{top.projection:+.4f}" in first_line
    assert cli.main(["readout", "--vectors", str(tmp_path / "nope"), "--text", "x"]) == 2
