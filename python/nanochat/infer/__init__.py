"""Generation: the C++ engine over a GGUF file, interactive chat, torch sampling."""
