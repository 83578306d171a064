"""Aliases that move by compare-and-swap, with history and rollback.

MLflow has no compare-and-swap on aliases (``set_registered_model_alias`` always overwrites),
so a promotion that evaluated against one holder could silently replace another that a racing
promotion or a rollback put there meanwhile. Every move therefore happens under a lock built
from MLflow's one atomic operation, and checks the holder it expects first.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from datetime import datetime, timezone

import mlflow
from mlflow import MlflowClient

from pipelines.registry.versions import RegistryError

log = logging.getLogger(__name__)

PREVIOUS_ALIAS_TAG = "previous_{alias}"  # registered-model tag: version that held the alias before
HISTORY_TAG = "alias_history_{alias}"  # registered-model tag: the alias's moves (JSON, newest last)
HISTORY_KEEP = 30  # entries kept (an MLflow tag value holds 5000 characters)
LOCK_NAME = "{name}.lock-{alias}"  # a registered model that exists only while a move is made
LOCK_TTL_S = 120.0  # a lock older than this was left by a killed job (the move takes seconds)


def alias_holder(name: str, alias: str, client: MlflowClient) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException:
        return None


class AliasMoved(RegistryError):
    """The alias no longer points where the caller last saw it (compare-and-swap lost)."""


@contextmanager
def alias_lock(name: str, alias: str, client: MlflowClient, wait_s: float = 60.0):
    """Mutual exclusion for the moves of ``name@alias``, by every promote and rollback, on any
    machine: MLflow's only atomic operation is creating a registered model under a name that
    must not exist yet, so the lock is a registered model named ``LOCK_NAME``, deleted on
    exit. One left by a killed job is removed once older than ``LOCK_TTL_S``."""
    lock = LOCK_NAME.format(name=name, alias=alias)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.create_registered_model(
                lock, description=f"lock for moving {name}@{alias}; deleted when the move is done"
            )
            break
        except mlflow.exceptions.MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            held = client.get_registered_model(lock)
        except mlflow.exceptions.MlflowException:
            continue  # released meanwhile: try again at once
        age_s = time.time() - held.creation_timestamp / 1000
        if age_s > LOCK_TTL_S:
            log.warning("removing the stale lock %s (%.0f s old)", lock, age_s)
            _delete_quietly(client, lock)
            continue
        if time.monotonic() > deadline:
            raise RegistryError(
                f"{name}@{alias}: another promotion or rollback holds {lock} "
                f"({age_s:.0f} s old); try again, or delete it if no job is running"
            )
        time.sleep(0.5)
    try:
        yield
    finally:
        _delete_quietly(client, lock)


def _delete_quietly(client: MlflowClient, name: str) -> None:
    try:
        client.delete_registered_model(name)
    except mlflow.exceptions.MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise


def alias_history(name: str, alias: str, client: MlflowClient) -> list[dict]:
    model = client.get_registered_model(name)
    return json.loads(model.tags.get(HISTORY_TAG.format(alias=alias), "[]"))


def _holder(model, alias: str) -> str | None:
    version = model.aliases.get(alias)
    return None if version is None else str(version)


def _record_move(model, alias, client, version, previous, how: str) -> None:
    """Remember ``previous`` for rollback and append the move to the history, from ``model``
    as read under the lock."""
    name = model.name
    if previous is not None:
        client.set_registered_model_tag(name, PREVIOUS_ALIAS_TAG.format(alias=alias), previous)
    history = json.loads(model.tags.get(HISTORY_TAG.format(alias=alias), "[]"))
    history.append({"version": version, "previous": previous, "how": how,
                    "at": datetime.now(timezone.utc).isoformat(timespec="seconds")})  # fmt: skip
    client.set_registered_model_tag(
        name, HISTORY_TAG.format(alias=alias), json.dumps(history[-HISTORY_KEEP:])
    )


def move_alias(
    name: str, alias: str, version: str, client: MlflowClient, *, expected: str | None = None
) -> str | None:
    """Point ``alias`` at ``version`` if it still points at ``expected`` (None: at nothing), a
    compare-and-swap under :func:`alias_lock`; AliasMoved otherwise. The previous holder is
    remembered (for rollback) and the move appended to the alias's history. Returns the
    previous holder."""
    with alias_lock(name, alias, client):
        model = client.get_registered_model(name)  # holder and history in one read
        previous = _holder(model, alias)
        if previous != expected:
            raise AliasMoved(
                f"{name}@{alias} was moved from {_v(expected)} to {_v(previous)} meanwhile "
                "(by another promotion or a rollback)"
            )
        client.set_registered_model_alias(name, alias, version)
        _record_move(model, alias, client, version, previous, "promote")
    return previous


def _v(version: str | None) -> str:
    return "nothing" if version is None else f"v{version}"


def rollback_alias(name: str, alias: str, client: MlflowClient) -> tuple[str | None, str]:
    """Point ``alias`` back at its previous holder; the version rolled back from becomes the
    new "previous" (so a second rollback undoes the first). Returns (from, to)."""
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException as e:
        raise RegistryError(f"registered model {name!r}: {e.message}") from None
    with alias_lock(name, alias, client):
        model = client.get_registered_model(name)  # read under the lock: the latest moves
        previous = model.tags.get(PREVIOUS_ALIAS_TAG.format(alias=alias))
        if not previous:
            raise RegistryError(
                f"{name}@{alias}: no previous holder recorded, nothing to roll back to"
            )
        current = _holder(model, alias)
        client.set_registered_model_alias(name, alias, previous)
        _record_move(model, alias, client, previous, current, "rollback")
    return current, previous
