"""Ray orchestration: cluster and placement, the trainer actor group, the rollout manager runtime, step glue."""
