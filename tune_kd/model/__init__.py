"""The models and the machine: device and precision, building or loading teacher and student, checkpoints (imports
config, data)."""
