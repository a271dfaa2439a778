"""Tracking in MLflow: where runs go and whether that store can be used (``store``), the retry
of transient errors (``retry``), a training run (``run``), runs left RUNNING by a process that is
gone (``orphans``) and the model registry (``registry``)."""
