"""Taggers that score a node's emotions when its user wrote no tag line (the reference's "subconscious
agents"): `lexicon` (Empath word counts) and `model` (the policy model's rating log-probabilities).
`carl_assets.memory.tagging.tag_nodes` combines them with the user's own tags."""
