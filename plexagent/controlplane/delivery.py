"""
Delivering a batch of report changes in one request, without letting one
poisoned change block the others.

When the control plane refuses a batch for its content (an error of kind
``REFUSED``), the delivery first checks that it takes an empty batch (else
the refusal is about the control plane, not the changes: the batch is
retried later as a whole), then bisects: halves are sent on their own
until each refused part is a single change, which is set aside (kept on
disk by the outbox, never retried). Everything else is delivered.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from twisted.internet import defer

from plexagent.controlplane.protocol import ControlPlaneError, ErrorKind, RefusedChange, SetAside
from plexagent.node.reports import Changes

#: One change of a batch: ("put", entry) or ("delete", key).
Change = tuple[str, Any]
#: Sends some puts and deletes in one request.
Post = Callable[[list[Mapping[str, Any]], list[str]], defer.Deferred[Any]]


def split(changes: Changes) -> list[Change]:
    return [("put", e) for e in changes.entries] + [("delete", k) for k in changes.deleted]


class BatchDelivery:
    """Sends ``changes`` through ``post``; fires once every change is delivered or set aside."""

    def __init__(self, post: Post, set_aside: SetAside) -> None:
        self._post = post
        self._set_aside = set_aside
        #: requests sent (the batch, the probe, the parts)
        self.posts = 0

    def _send(self, part: list[Change]) -> defer.Deferred[Any]:
        self.posts += 1
        return self._post([c for kind, c in part if kind == "put"], [c for kind, c in part if kind == "delete"])

    async def deliver(self, changes: Changes) -> None:
        batch = split(changes)
        try:
            await self._send(batch)
            return
        except ControlPlaneError as e:
            if e.kind is not ErrorKind.REFUSED:
                raise
            refusal = e
        try:
            await self._send([])
        except ControlPlaneError as e:
            if e.kind is ErrorKind.REFUSED:
                # Even an empty batch is refused: the changes are not the
                # reason. Retry the whole batch later; nothing is set aside.
                raise ControlPlaneError(refusal.call, ErrorKind.TRANSIENT, str(refusal), status=refusal.status,
                                        retry_after=refusal.retry_after) from None
            raise
        half = len(batch) // 2
        parts = [batch[:half], batch[half:]] if half else [batch]
        while parts:
            part = parts[0]
            try:
                await self._send(part)
            except ControlPlaneError as e:
                if e.kind is not ErrorKind.REFUSED:
                    raise
                if len(part) == 1:
                    kind, value = part[0]
                    key = value["key"] if kind == "put" else value
                    await self._set_aside(RefusedChange(kind, key, value if kind == "put" else None, e.status,
                                                        e.code))
                else:
                    half = len(part) // 2
                    parts[0:1] = [part[:half], part[half:]]
                    continue
            parts.pop(0)


def deliver_batch(post: Post, changes: Changes, set_aside: SetAside) -> defer.Deferred[None]:
    return defer.ensureDeferred(BatchDelivery(post, set_aside).deliver(changes))
