"""The GPT and its layers (BitLinear, attention, mHC, MoE, MTP heads) built on `nanochat.ops`,
and loading a checkpoint into a model."""
