"""Other ecosystems' model files in and out (transformers' BitNet: hf_bitnet.py)."""
