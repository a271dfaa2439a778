"""The tooling: what changes no byte of any output, so that no stage's ``deps`` name it and
editing it re-runs nothing. The command layer of the stages and console tools (``cli``,
``parent``, ``console``), tracking in MLflow (``tracking``), the metrics gate (``gate``), sharing
experiments with a team (``team``) and git (``git``). It imports the numerics (``nnbp``); the
numerics never import it."""
