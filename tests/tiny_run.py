"""The small run config the whole-graph tests share: tiny model, few dreams and steps. These tests are
about the graph running end to end, not about the numbers."""

# The smallest offline base model the graph tests train (a few steps of a 2-layer Llama).
TINY_BASE_MODEL = {
    "hidden_size": 32,
    "num_layers": 2,
    "num_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 512,
    "steps": 3,
    "seq_len": 32,
    "batch_size": 2,
}

TINY = {
    "ops": {
        "base_model": {
            "config": {
                "hidden_size": 32,
                "num_layers": 2,
                "num_heads": 2,
                "intermediate_size": 64,
                "vocab_size": 512,
                "steps": 5,
                "seq_len": 32,
                "batch_size": 4,
            }
        },
        "steering_vectors": {"config": {"max_length": 64}},
        "dream_scenarios": {
            "config": {
                "n_scenarios": 3,
                "responses_per_scenario": 2,
                "max_new_tokens": 6,
                "heldout_scenarios": 2,
                "excerpt_chars": 40,
            }
        },
        "sft_dataset": {"config": {"max_examples": 8, "holdout_tasks": 2}},
        "sft_checkpoint": {"config": {"max_steps": 3, "batch_size": 4, "max_length": 768}},
        "crystallization_events": {"config": {"require_crystallization": False}},
        "grpo_checkpoint": {
            "config": {
                "max_steps": 1,
                "batch_size": 4,
                "num_generations": 2,
                "max_completion_length": 6,
                "max_prompts": 4,
            }
        },
        "agent_evaluation": {"config": {"max_new_tokens": 6, "max_tasks": 2}},
        "leworld_memory": {"config": {"num_words": 4096}},
        "leworld_dataset": {"config": {"num_train": 32, "num_validation": 8, "seq_length": 4}},
        "leworld_model": {
            "config": {
                "phase1_epochs": 1,
                "phase2_epochs": 1,
                "phase3_epochs": 1,
                "slm_d_model": 16,
                "blm_d_model": 32,
                "max_read_range": 32,
            }
        },
        "leworld_evaluation": {"config": {"n_steps": 2}},
    }
}
