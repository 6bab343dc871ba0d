"""The GPU workers: Celery tasks (:mod:`workers.tasks`) that train trials (:mod:`workers.trial`,
:mod:`workers.training`), run study steps (:mod:`workers.study`) and deliver callbacks
(:mod:`workers.callbacks`)."""
