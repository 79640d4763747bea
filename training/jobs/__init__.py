"""The jobs the DAGs run: pretraining, fine-tuning and the model registry."""
