"""The MLflow Model registry: the best configuration's LoggedModel as ``models:/NAME@champion``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ...errors import first_line
from ...files import file_md5
from .store import (
    OPT_OUT,
    WEIGHTS_MD5_TAG,
    TrackingError,
    check_store,
    find_experiment,
    tracking_uri,
)


def register(weights_path: str | Path, model_name: str, alias: str = "champion") -> str:
    """Register the LoggedModel of ``weights_path`` as a version of ``model_name`` and point
    ``alias`` at it; returns a one-line summary with its ``models:/NAME@ALIAS`` URI.

    The model is found by the MD5 of the weights file (each LoggedModel carries it), so it is the
    one trained from exactly these bytes, however DVC came by them. Registering the model that
    ``alias`` already points to does nothing. ``TrackingError`` (one line) when tracking is off,
    the store cannot be used, or no run logged these weights.
    """
    uri = tracking_uri()
    if uri is None:
        raise TrackingError(f"{OPT_OUT}=off: there is no MLflow store to register a model in")
    check_store(uri)
    md5 = file_md5(weights_path)
    try:
        client, experiment_id = find_experiment(uri)
        from mlflow.exceptions import MlflowException

        found = []
        if experiment_id is not None:
            found = client.search_logged_models(
                experiment_ids=[experiment_id],
                filter_string=f"tags.`{WEIGHTS_MD5_TAG}` = '{md5}'",
                order_by=[{"field_name": "creation_timestamp", "ascending": False}],
                max_results=1,
            )
        if not found:
            raise TrackingError(
                f"{weights_path}: no MLflow model of these weights (MD5 {md5}) in {uri}; train "
                "it with tracking on (dvc repro --force on its train stage), then register it"
            )
        model = found[0]
        try:
            current = client.get_model_version_by_alias(model_name, alias)
        except MlflowException:
            current = None  # no such model or alias yet
        # The version's source is the model's URI (a SQL store leaves its model_id empty).
        if current is not None and model.model_id in (current.model_id, _model_id(current.source)):
            version = current
            what = "already"
        else:
            import mlflow

            # mlflow.register_model, not the client's create_model_version: it also tags the
            # LoggedModel with its version, which the UI's model list shows.
            mlflow.set_tracking_uri(uri)
            mlflow.set_registry_uri(uri)
            version = mlflow.register_model(model.model_uri, model_name)
            client.set_registered_model_alias(model_name, alias, version.version)
            what = "now"
    except TrackingError:
        raise
    except Exception as e:
        raise TrackingError(f"MLflow store {uri} cannot be used: {first_line(e)}") from None
    return (
        f"{weights_path} is {what} {model_name} version {version.version} "
        f"(models:/{model_name}@{alias}, logged model {model.model_id})"
    )


def _model_id(source: str | None) -> str | None:
    return source.removeprefix("models:/") if source and source.startswith("models:/m-") else None


def champion(metrics: Mapping[str, Mapping[str, float]], key: str = "test_acc") -> str:
    """The configuration with the highest ``key`` (the experiment's primary metric) in the
    evaluate stage's metrics; a tie goes to the first, i.e. the smaller network."""
    if not metrics:
        raise TrackingError("no configuration in the metrics: nothing to register")
    return max(metrics, key=lambda name: metrics[name][key])
