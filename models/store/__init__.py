"""The records the API and the workers keep: a run's life in MLflow (:mod:`models.store.runs`), the
Optuna study storage (:mod:`models.store.search`), Redis key names (:mod:`models.store.keys`) and a
study's trial slots (:mod:`models.store.budget`)."""
