"""The distillation maths: scored positions, CE and the divergences in fp32, the output layer a chunk at a time
(imports config .. model)."""
