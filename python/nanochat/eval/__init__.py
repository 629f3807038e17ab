"""Evaluation: code benchmarks (HumanEval, HumanEval-Rust) run in a sandbox."""
