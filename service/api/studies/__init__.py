"""/studies: a search over trial specs, run by the workers through Optuna."""
