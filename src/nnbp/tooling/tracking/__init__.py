"""Tracking in MLflow, one job per module: where runs go and whether that store can be used
(``store``), the retry of transient errors (``retry``), a training run's lifecycle and what it
logs (``run``), the trained network as an MLflow Model (``mlflow_model``), a run's system metrics
(``system``) and heartbeat (``heartbeat``), runs left RUNNING by a process that is gone
(``orphans``) and the model registry (``registry``)."""
