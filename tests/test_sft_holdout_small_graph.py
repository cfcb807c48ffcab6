"""A graph with fewer answerable nodes than max_examples + holdout_tasks still holds out agent tasks
(memory case real-10, memory_no_lesson.jsonl: `carl materialize --select 'memory_graph*'` failed in
agent_evaluation with 'agent_tasks is empty'); a large graph's split is unchanged."""

from carl_assets.carl.sft_data import SFTDataConfig, _split_nodes


def _candidates(n: int) -> list[dict]:
    return [{"node_id": f"n{i:03d}", "task": "feelings"} for i in range(n)]


def test_small_graph_keeps_a_quarter_for_the_agent():
    train, held = _split_nodes(_candidates(40), SFTDataConfig(max_examples=56, holdout_tasks=12))
    assert (len(train), len(held)) == (30, 10)  # 40 // 4 = 10 held out, the rest trains
    assert not {r["node_id"] for r in train} & {r["node_id"] for r in held}
    train, held = _split_nodes(_candidates(3), SFTDataConfig(max_examples=56, holdout_tasks=12))
    assert (len(train), len(held)) == (2, 1)  # at least one task


def test_large_graph_split_unchanged_and_holdout_zero_respected():
    config = SFTDataConfig(max_examples=48, holdout_tasks=12)
    train, held = _split_nodes(_candidates(200), config)
    assert (len(train), len(held)) == (48, 12)
    train, held = _split_nodes(_candidates(10), SFTDataConfig(max_examples=48, holdout_tasks=0))
    assert (len(train), len(held)) == (10, 0)
