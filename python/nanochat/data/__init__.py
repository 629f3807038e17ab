"""Text in, tokens out: the source corpus, the tokenizer, token files and the batch loader."""
