"""The records the API and the workers keep: a run's life in MLflow (:mod:`models.store.runs`), the
Optuna study storage (:mod:`models.store.search`), registered model names claimed by teams in it
(:mod:`models.store.claims`), Redis key names (:mod:`models.store.keys`) and a
study's trial slots (:mod:`models.store.budget`)."""
