"""What a rank-0 checkpoint holds for the training side, as bytes the launcher carries without reading.

Weights, the optimizer's variables (its step count and moments, so a resumed run goes on from where
it was, on the same batches; dropout's random state is not kept, so a variant with dropout resumes
close to, not bit for bit like, an undisturbed run), the history and epoch times so far (so every
epoch appears exactly once in the final report). Stored with ``numpy.savez`` (``allow_pickle=False``):
loading it runs no code.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

META = "meta"
WEIGHT_PREFIX, OPTIMIZER_PREFIX = "w", "o"


@dataclass
class TrainingState:
    epoch: int  # epochs completed
    weights: list[np.ndarray]
    optimizer: list[np.ndarray]
    history: dict[str, list[float]]
    epoch_seconds: list[float]


def pack(model: Any, epoch: int, history: dict[str, list[float]], epoch_seconds: list[float]) -> bytes:
    weights = model.get_weights()
    optimizer = [np.asarray(variable.numpy()) for variable in model.optimizer.variables]
    meta = {"epoch": epoch, "history": history, "epoch_seconds": epoch_seconds,
            "weights": len(weights), "optimizer": len(optimizer)}
    arrays = {f"{WEIGHT_PREFIX}{i}": w for i, w in enumerate(weights)}
    arrays.update({f"{OPTIMIZER_PREFIX}{i}": v for i, v in enumerate(optimizer)})
    arrays[META] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


def unpack(data: bytes) -> TrainingState:
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        meta = json.loads(arrays[META].tobytes().decode("utf-8"))
        return TrainingState(
            epoch=int(meta["epoch"]),
            weights=[arrays[f"{WEIGHT_PREFIX}{i}"] for i in range(meta["weights"])],
            optimizer=[arrays[f"{OPTIMIZER_PREFIX}{i}"] for i in range(meta["optimizer"])],
            history={key: [float(v) for v in values] for key, values in meta["history"].items()},
            epoch_seconds=[float(s) for s in meta["epoch_seconds"]],
        )


def restore(model: Any, state: TrainingState) -> None:
    """Put a checkpoint's weights and optimizer state into a freshly built, compiled model.

    Call it where the model was built (the backend's model scope): the optimizer's slots are created
    there first, then assigned.
    """
    model.set_weights(state.weights)
    optimizer = model.optimizer
    optimizer.build(model.trainable_variables)
    variables = list(optimizer.variables)
    if len(variables) != len(state.optimizer):
        raise ValueError(
            f"the checkpoint holds {len(state.optimizer)} optimizer variables, the model's optimizer has "
            f"{len(variables)}: it was written for another variant or optimizer"
        )
    for variable, value in zip(variables, state.optimizer):
        variable.assign(value)
