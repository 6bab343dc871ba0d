"""Training on tensors: the loop, batches, divergence, data-parallel ranks, how a trial stops. No Celery, MLflow or Redis."""
