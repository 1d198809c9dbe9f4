"""`tune-kd <command>` and `python -m tune_kd.<command>`: one parser and one error handler per command (the top
layer)."""
