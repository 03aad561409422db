"""An item's outcome as a wire `Result`: one place for the gRPC servicer (`server.py`) and the queue
consumer (`queue/finishing.py`), so both say the same thing about the same outcome."""

from __future__ import annotations

from protos.spie.reward.v1 import reward_pb2 as pb
from reward_servers.batcher import ItemOutcome
from reward_servers.gradients import encode_tensor

STATUS = {
    "ok": pb.Result.STATUS_OK,
    "invalid_input": pb.Result.STATUS_INVALID_INPUT,
    "scorer_error": pb.Result.STATUS_SCORER_ERROR,
}


def fill_result(result: pb.Result, outcome: ItemOutcome) -> pb.Result:
    """Write `outcome` (score, status, details, texts, error, gradient) into `result`; returns it."""
    result.score, result.status = outcome.score, STATUS[outcome.kind]
    result.details.update(outcome.details)
    result.texts.update(outcome.texts)
    if outcome.error:
        result.error = outcome.error
    if outcome.gradient is not None:
        result.gradient.CopyFrom(encode_tensor(outcome.gradient))
    return result
