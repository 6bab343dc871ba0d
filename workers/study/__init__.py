"""A study on the worker side: one step (one trial through Optuna) and the report at its end."""
