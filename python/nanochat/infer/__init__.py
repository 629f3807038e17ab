"""Generation: the C++ engine over a GGUF file, interactive chat, the OpenAI-compatible
server (nanochat serve), torch sampling."""
