"""The search as a recipe: prepare, Ray, searcher and scheduler, trainable, resources, controls, the served
teacher's actor (imports config .. results)."""
