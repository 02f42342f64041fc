"""
Image cleanup with a plan: which images ``POST /images/cleanup`` (with a
body) and the automatic cleanup remove, and why.

- Dangling images (no tag, no digest) are always candidates; tagged images
  only when ``keep_last`` or ``older_than`` asks: a repository's images
  beyond its newest ``keep_last`` (by creation time), and older than
  ``older_than`` when both are given. ``repository_prefix`` limits the
  cleanup to the repositories it starts (and so leaves dangling images,
  which belong to no repository, alone).
- An image used by any container (running or stopped), by a cron job, or
  kept for a container's rollback is never touched (``protected``), and
  Docker itself refuses to untag the last reference of an image a
  container created meanwhile uses: that image is reported as skipped.
- Bytes: Docker's unique size of each deleted image (``Size -
  SharedSize``: what no other image shares), plus the build cache pruned.
  Layers shared only among deleted images are not counted, so the disk
  may gain more than the answer says, never less.

The planning is a pure function of Docker's image list (``plan``); the
blocking part (``run_cleanup``) runs on the Docker pool.
"""

from __future__ import annotations

import datetime as _dt
import re
import time
from typing import Any

import attrs
import docker.errors

from plexagent import errors
from plexagent.host.docker.specs import split_image

#: The body fields of ``POST /images/cleanup``.
FIELDS = ("keep_last", "older_than", "repository_prefix", "include_build_cache", "dry_run")
MAX_KEEP_LAST = 1_000_000
#: The longest ``older_than``: a century, far within a float's exact seconds.
MAX_AGE = 100 * 365 * 86400
_DURATION = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?[smhd])+")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_PREFIX = re.compile(r"[a-z0-9][a-z0-9._/:-]{0,254}")


@attrs.frozen
class CleanupOptions:
    """What a cleanup removes (see the module's docstring)."""

    keep_last: int | None = None
    #: seconds; with its text as given in ``older_than_text``
    older_than: float | None = None
    older_than_text: str | None = None
    repository_prefix: str | None = None
    include_build_cache: bool = False
    dry_run: bool = False

    def document(self) -> dict[str, Any]:
        return {
            "keep_last": self.keep_last,
            "older_than": self.older_than_text,
            "repository_prefix": self.repository_prefix,
            "include_build_cache": self.include_build_cache,
            "dry_run": self.dry_run,
        }


def parse_duration(value: Any, field: str = "older_than") -> float:
    """A duration such as ``"72h"``, ``"1h30m"`` or ``"7d"`` (units s, m, h, d) in seconds; 400 otherwise."""
    if not isinstance(value, str) or not _DURATION.fullmatch(value):
        raise errors.InvalidInput(
            f"invalid {field}",
            f"{field} must be a duration such as \"72h\", \"90m\" or \"1d12h\" (units s, m, h, d), got {value!r}",
        )
    seconds = sum(float(number) * _UNITS[unit] for number, unit in _DURATION_PART.findall(value))
    if seconds > MAX_AGE:
        raise errors.InvalidInput(f"invalid {field}", f"{field} must be at most 100 years")
    return seconds


def _strict_bool(body: dict[str, Any], field: str) -> bool:
    value = body.get(field, False)
    if not isinstance(value, bool):
        raise errors.InvalidInput(f"invalid {field}", f"{field} must be true or false")
    return value


def parse_cleanup_options(body: dict[str, Any]) -> CleanupOptions:
    """The body of ``POST /images/cleanup``, every field checked; 400 naming the field otherwise."""
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise errors.InvalidInput(
            f"unknown field {unknown[0]}", f"the cleanup body takes only {', '.join(FIELDS)}"
        )
    keep_last = body.get("keep_last")
    if keep_last is not None and (
        isinstance(keep_last, bool) or not isinstance(keep_last, int) or not 0 <= keep_last <= MAX_KEEP_LAST
    ):
        raise errors.InvalidInput("invalid keep_last", f"keep_last must be an integer from 0 to {MAX_KEEP_LAST}")
    older_text = body.get("older_than")
    older = None if older_text is None else parse_duration(older_text)
    prefix = body.get("repository_prefix")
    if prefix is not None and (not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix)):
        raise errors.InvalidInput(
            "invalid repository_prefix",
            "repository_prefix must be the start of a repository name such as \"registry.local:5000/app\" "
            "(lowercase letters, digits, '.', '_', '-', '/', ':'; at most 255)",
        )
    return CleanupOptions(
        keep_last=keep_last,
        older_than=older,
        older_than_text=older_text,
        repository_prefix=prefix,
        include_build_cache=_strict_bool(body, "include_build_cache"),
        dry_run=_strict_bool(body, "dry_run"),
    )


# -- the plan ------------------------------------------------------------------


def references(image: dict[str, Any]) -> list[str]:
    """The tags and digest references of an image in Docker's list (without ``<none>``)."""
    refs = [r for r in (image.get("RepoTags") or []) if isinstance(r, str) and not r.startswith("<none>")]
    refs += [r for r in (image.get("RepoDigests") or []) if isinstance(r, str) and not r.startswith("<none>")]
    return refs


def unique_size(image: dict[str, Any]) -> int:
    """Bytes of ``image`` no other image shares (Docker's unique size)."""
    size = int(image.get("Size") or 0)
    shared = image.get("SharedSize")
    if isinstance(shared, int) and shared >= 0:
        return max(0, size - shared)
    return size


def _iso(epoch: Any) -> str:
    try:
        return _dt.datetime.fromtimestamp(float(epoch), _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (TypeError, ValueError, OverflowError, OSError):
        return ""


@attrs.define
class Removal:
    """One image the cleanup removes references of (all of them: the image is deleted)."""

    image: dict[str, Any]
    refs: list[str]
    reason: str

    @property
    def id(self) -> str:
        return str(self.image.get("Id", ""))

    @property
    def deletes(self) -> bool:
        return set(self.refs) >= set(references(self.image))


def plan(images: list[dict[str, Any]], options: CleanupOptions, now: float) -> list[Removal]:
    """The removals ``options`` asks for among Docker's top-level ``images`` (protection not applied)."""
    cutoff = None if options.older_than is None else now - options.older_than
    prefix = options.repository_prefix
    chosen: dict[str, Removal] = {}

    def old_enough(image: dict[str, Any]) -> bool:
        return cutoff is None or float(image.get("Created") or 0) <= cutoff

    by_repository: dict[str, list[dict[str, Any]]] = {}
    for image in images:
        refs = references(image)
        if not refs:
            if prefix is None and old_enough(image):
                chosen[image["Id"]] = Removal(image, [], "dangling")
            continue
        for ref in refs:
            repository = split_image(ref)[0]
            group = by_repository.setdefault(repository, [])
            if image not in group:
                group.append(image)
    if options.keep_last is None and cutoff is None:
        return list(chosen.values())
    for repository, group in sorted(by_repository.items()):
        if prefix is not None and not repository.startswith(prefix):
            continue
        newest_first = sorted(group, key=lambda i: (-float(i.get("Created") or 0), i["Id"]))
        for rank, image in enumerate(newest_first):
            if options.keep_last is not None and rank < options.keep_last:
                continue
            if not old_enough(image):
                continue
            why = []
            if options.keep_last == 0:
                why.append("unused")
            elif options.keep_last is not None:
                why.append(f"not among the newest {options.keep_last} of {repository}")
            if cutoff is not None:
                why.append(f"older than {options.older_than_text}")
            refs = [r for r in references(image) if split_image(r)[0] == repository]
            removal = chosen.setdefault(image["Id"], Removal(image, [], " and ".join(why)))
            removal.refs.extend(r for r in refs if r not in removal.refs)
    return list(chosen.values())


# -- running it (blocking: on the Docker pool) -----------------------------------


def protected_ids(client: Any, protected: dict[str, str]) -> dict[str, str]:
    """
    image ID -> why it must stay: every image a container uses, and the
    images ``protected`` names (by reference or ID: cron jobs, rollbacks).
    """
    found: dict[str, str] = {}
    for container in client.api.containers(all=True):
        image_id = container.get("ImageID")
        names = container.get("Names") or [container.get("Id", "")[:12]]
        if image_id and image_id not in found:
            found[image_id] = f"used by container {str(names[0]).lstrip('/')}"
    for reference, why in protected.items():
        try:
            image_id = client.api.inspect_image(reference)["Id"]
        except docker.errors.NotFound:
            continue
        found.setdefault(image_id, why)
    return found


def _remove_references(client: Any, removal: Removal) -> tuple[list[str], list[str], str | None]:
    """(untagged, deleted IDs, why it stopped) of removing ``removal``'s references, tags first."""
    untagged: list[str] = []
    deleted: list[str] = []
    api = client.api
    targets = removal.refs or [removal.id]
    for ref in sorted(targets, key=lambda r: "@" in r):
        try:
            answer = api.remove_image(ref, force=False, noprune=False)
        except docker.errors.NotFound:
            continue  # gone with an earlier reference of the same image
        except docker.errors.APIError as e:
            if e.status_code == 409:
                # A container started using it since the plan: Docker keeps it.
                return untagged, deleted, f"kept by Docker: {e.explanation or e}"
            raise
        for line in answer or []:
            if line.get("Untagged"):
                untagged.append(line["Untagged"])
            if line.get("Deleted"):
                deleted.append(line["Deleted"])
    return untagged, deleted, None


def _build_cache(client: Any, options: CleanupOptions, df: dict[str, Any]) -> dict[str, Any]:
    if options.dry_run:
        entries = [e for e in (df.get("BuildCache") or []) if not e.get("InUse") and not e.get("Shared")]
        return {"removed": len(entries), "space_reclaimed": sum(int(e.get("Size") or 0) for e in entries)}
    filters = {"until": f"{int(options.older_than)}s"} if options.older_than is not None else None
    answer = client.api.prune_builds(filters=filters) or {}
    return {"removed": len(answer.get("CachesDeleted") or []), "space_reclaimed": int(answer.get("SpaceReclaimed") or 0)}


def run_cleanup(client: Any, options: CleanupOptions, protected: dict[str, str], now: float | None = None) -> dict[str, Any]:
    """In a worker thread: plan the cleanup, apply it unless ``dry_run``, and say what it did."""
    df = client.df()
    removals = plan(df.get("Images") or [], options, time.time() if now is None else now)
    keep = protected_ids(client, protected)
    # Docker's answers name deleted layers too: only image IDs are reported.
    image_ids = set(client.api.images(all=True, quiet=True))
    images: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    untagged: list[str] = []
    deleted: list[str] = []
    reclaimed = 0
    for removal in removals:
        size = unique_size(removal.image)
        entry: dict[str, Any] = {"id": removal.id, "references": list(removal.refs),
                                 "created": _iso(removal.image.get("Created")), "size": size, "reason": removal.reason}
        if removal.id in keep:
            skipped.append({**entry, "reason": keep[removal.id]})
            continue
        if options.dry_run:
            gone = removal.deletes
            untagged.extend(removal.refs)
        else:
            done, ids, stopped = _remove_references(client, removal)
            untagged.extend(done)
            deleted.extend(i for i in ids if i != removal.id and i in image_ids)
            gone = removal.id in ids
            if stopped is not None:
                skipped.append({**entry, "reason": stopped})
                if not done:
                    continue
        if gone:
            deleted.append(removal.id)
            reclaimed += size
        images.append({**entry, "deleted": gone})
    deleted = list(dict.fromkeys(deleted))
    answer: dict[str, Any] = {
        "success": True,
        "dry_run": options.dry_run,
        # As Docker's prune counts: every image deleted, parents of a legacy build included.
        "removed": len(deleted),
        "images_deleted": deleted,
        "untagged": untagged,
        "space_reclaimed": reclaimed,
        "images": images,
        "skipped": skipped,
        "options": options.document(),
    }
    if options.include_build_cache:
        cache = _build_cache(client, options, df)
        answer["build_cache"] = cache
        answer["space_reclaimed"] += cache["space_reclaimed"]
    return answer
