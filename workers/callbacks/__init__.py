"""Callbacks: queue a run's ended event (:mod:`.announce`) and deliver it on the light callback worker."""
