"""``convtune up``: the local stack (Redis if needed, MLflow, workers, the API) and its demo."""
