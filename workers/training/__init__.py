"""Training on tensors: the loop, the LR range test, batches, divergence, data-parallel ranks, how a trial stops. No Celery, MLflow or Redis."""
