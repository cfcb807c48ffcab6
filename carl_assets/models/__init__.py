"""Model loading: the offline default (a BPE tokenizer and a small Llama trained on the memory text),
hub ids and local folders (`loading`)."""
