"""The MLflow Model Registry behind a small adapter: versions, tags, aliases, all-or-nothing alias moves."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.errors import PipelineError
from pipeline.registry.card import fit_description

CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG = "champion_history"  # JSON list of versions that have been champion, oldest first


class RegistryError(PipelineError):
    """A registry action is not possible (unknown model/alias, nothing pending, ...); nothing changed."""

    exit_code = 6


@dataclass
class _Snapshot:
    aliases: dict[str, dict[str, str]] = field(default_factory=dict)  # model → alias → version
    tags: dict[str, dict[str, str | None]] = field(default_factory=dict)  # model → tag → value (None: absent)
    version_tags: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)  # (model, version) → its tags


class ModelRegistry:
    """Registered models of one tracking server (``tracking_uri``)."""

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def register(self, name: str, model_uri: str, tags: Mapping[str, str]) -> ModelVersion:
        """A new version of ``name`` (created on first use) from a logged model's ``models:/<model_id>`` URI.

        Through this registry's own client: ``mlflow.register_model`` would need MLflow's
        process-wide tracking and registry URIs set, and they would outlive the call.
        """
        model_id = model_uri.removeprefix("models:/")
        if model_id == model_uri or not model_id or "/" in model_id:
            raise RegistryError(f"{model_uri!r}: expected a logged model's URI, models:/<model_id>")
        try:
            self.client.get_registered_model(name)
        except MlflowException:
            self.client.create_registered_model(name)
        return self.client.create_model_version(
            name, model_uri, tags={key: str(value) for key, value in tags.items()}, model_id=model_id
        )

    def describe(self, name: str, version: str, description: str) -> None:
        """Set a version's description, fitted to what every MLflow store keeps (SQLite would keep more, PostgreSQL
        refuses it)."""
        self.client.update_model_version(name, version, description=fit_description(description))

    def delete_version(self, name: str, version: str) -> None:
        self.client.delete_model_version(name, version)

    def version(self, name: str, ref: str) -> ModelVersion:
        """``ref`` is a version number or an alias; a clear error when neither exists."""
        try:
            if ref.isdigit():
                return self.client.get_model_version(name, ref)
            return self.client.get_model_version_by_alias(name, ref)
        except MlflowException as exc:
            raise RegistryError(f"{name}@{ref}: no such registered model version or alias") from exc

    def find(self, name: str, alias: str) -> ModelVersion | None:
        """The version holding ``alias``, or None (also when the model is not registered yet)."""
        if alias not in self.aliases(name):
            return None
        return self.client.get_model_version_by_alias(name, alias)

    def aliases(self, name: str) -> dict[str, str]:
        """alias → version of ``name`` (empty when the model is not registered)."""
        try:
            return {alias: str(version) for alias, version in self.client.get_registered_model(name).aliases.items()}
        except MlflowException:
            return {}

    def versions(self, name: str) -> list[ModelVersion]:
        found = self.client.search_model_versions(f"name = '{name}'")
        return sorted(found, key=lambda v: int(v.version))

    def model_tags(self, name: str) -> dict[str, str]:
        try:
            return dict(self.client.get_registered_model(name).tags)
        except MlflowException:
            return {}

    def champion_history(self, name: str) -> list[str]:
        return json.loads(self.model_tags(name).get(HISTORY_TAG, "[]"))

    def set_version_tags(self, name: str, version: str, tags: Mapping[str, object]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(name, version, key, str(value))

    @contextmanager
    def transaction(self, names: list[str], versions: Sequence[tuple[str, str]] = ()) -> Iterator[None]:
        """Alias and model-tag changes of ``names``, and tag changes of ``versions`` ((model, version) pairs),
        inside the block happen all together or not at all.

        The registry has no transactions, so the state of every alias and tag of ``names`` (and every tag of
        ``versions``) is saved first and written back if anything in the block fails; the error then propagates.
        """
        snapshot = _Snapshot(
            aliases={name: self.aliases(name) for name in names},
            tags={name: dict(self.model_tags(name)) for name in names},
            version_tags={(name, version): dict(self.client.get_model_version(name, version).tags) for name, version in versions},
        )
        try:
            yield
        except BaseException:
            self._restore(snapshot)
            raise

    def move_alias(self, name: str, alias: str, version: str | None) -> None:
        """Point ``alias`` at ``version`` (None: remove it)."""
        if version is None:
            if alias in self.aliases(name):
                self.client.delete_registered_model_alias(name, alias)
        else:
            self.client.set_registered_model_alias(name, alias, version)

    def set_model_tag(self, name: str, key: str, value: str | None) -> None:
        """Set ``key`` (None: remove it)."""
        if value is not None:
            self.client.set_registered_model_tag(name, key, value)
        elif key in self.model_tags(name):
            self.client.delete_registered_model_tag(name, key)

    def _restore(self, snapshot: _Snapshot) -> None:
        for name, saved in snapshot.aliases.items():
            current = self.aliases(name)
            for alias in current.keys() - saved.keys():
                self.client.delete_registered_model_alias(name, alias)
            for alias, version in saved.items():
                if current.get(alias) != version:
                    self.client.set_registered_model_alias(name, alias, version)
        for name, saved_tags in snapshot.tags.items():
            current_tags = self.model_tags(name)
            for key in current_tags.keys() - saved_tags.keys():
                self.client.delete_registered_model_tag(name, key)
            for key, value in saved_tags.items():
                if current_tags.get(key) != value:
                    self.client.set_registered_model_tag(name, key, value)
        for (name, version), saved_version_tags in snapshot.version_tags.items():
            current_version_tags = dict(self.client.get_model_version(name, version).tags)
            for key in current_version_tags.keys() - saved_version_tags.keys():
                self.client.delete_model_version_tag(name, version, key)
            for key, value in saved_version_tags.items():
                if current_version_tags.get(key) != value:
                    self.client.set_model_version_tag(name, version, key, value)
