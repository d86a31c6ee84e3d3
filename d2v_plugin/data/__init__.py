"""Datasets and collaters of the pretraining and downstream tasks."""
