"""A model replica that dies (or a full queue) is a JSON 503 with Retry-After, never a 500."""

from __future__ import annotations


def test_a_request_on_a_replica_that_died_is_a_503_with_retry_after():
    from ray.exceptions import ActorDiedError, RayActorError
    from ray.serve.exceptions import BackPressureError

    from serving.ingress import _unavailable

    for error in (
        RayActorError(),
        ActorDiedError(),
        BackPressureError(num_queued_requests=1, max_queued_requests=1),
    ):
        mapped = _unavailable(error)
        assert mapped is not None and mapped.status == 503, error
        assert mapped.headers == {"Retry-After": "1"}
