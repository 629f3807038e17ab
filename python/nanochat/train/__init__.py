"""The training loop and what it applies to a model from outside: schedules, checkpoints,
metrics, Collider token filtering, recipes."""
