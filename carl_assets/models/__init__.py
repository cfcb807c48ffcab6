"""Model loading: the offline default (a BPE tokenizer and a small Llama trained on the memory text),
hub ids, local folders, GGUF files and packaged models (`loading`, `gguf`, `packaged`), and the one
policy for tokenizers without a chat template or pad token (`chat_template`)."""
