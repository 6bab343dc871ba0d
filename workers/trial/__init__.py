"""One delivery of a run (a trial or a range test): admit it, hold its lease, track it in MLflow, end it."""
