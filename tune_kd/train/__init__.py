"""One distillation run: build_run(cfg) -> Run, the loop, the step, validation, on-policy batches (imports config
.. teacher; never Ray)."""
