"""The training engine: configuration, distributed set-up, the loop, schedules,
checkpoints, metrics and the kNN monitor. Wires pipeline and model; re-implements
neither."""
