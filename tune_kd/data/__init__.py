"""Chat files -> token ids and assistant masks, tokenized once into a memory-mapped cache; splits and batches
(imports config)."""
