"""tune_kd: hyperparameter search for knowledge distillation of causal language models."""
