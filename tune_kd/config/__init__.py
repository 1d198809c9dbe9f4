"""The experiment's configuration: the YAML -> typed, frozen ExperimentConfig, every problem at once (bottom layer:
imports no other package)."""
