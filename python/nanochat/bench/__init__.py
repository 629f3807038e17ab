"""`nanochat bench NAME`: side-by-side measurements that print ratios (see docs/benchmarks.md)."""
