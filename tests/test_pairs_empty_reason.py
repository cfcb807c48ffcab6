"""emotion_training_pairs' empty reason names the real cause on an untagged graph (memory case real-06's
repro: `carl materialize --select memory_graph,emotion_training_pairs,steering_vectors`, emotion_tags left
out)."""

from types import SimpleNamespace

import pandas as pd

from carl_assets.defs.emotion_pairs import PairsConfig, _empty_reason

UNTAGGED = SimpleNamespace(nodes=pd.DataFrame({"n_tags": [0, 0, 0]}))


def test_auto_without_emotion_tags_says_emotion_tags_is_missing():
    # _nodes_with_tags returns (tagger None, used 'user') when emotion_tags was never materialized.
    reason = _empty_reason(UNTAGGED, PairsConfig(), None, "user")
    assert "emotion_tags has not been materialized" in reason
    assert "tag_sources = 'user'" not in reason  # the user never set it: the default is 'auto'


def test_explicit_user_and_tagger_reasons_unchanged():
    assert "tag_sources = 'user'" in _empty_reason(UNTAGGED, PairsConfig(tag_sources="user"), None, "user")
    reason = _empty_reason(UNTAGGED, PairsConfig(tag_sources="user"), "lexicon", "user")
    assert "tag_sources = 'user'" in reason
    assert "'lexicon' tagger" in _empty_reason(UNTAGGED, PairsConfig(), "lexicon", "all")
    assert "tagger is 'off'" in _empty_reason(UNTAGGED, PairsConfig(), "off", "all")
