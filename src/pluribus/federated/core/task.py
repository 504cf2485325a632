"""A client's private task: the data contract between a task suite and the split model (inputs, targets, kind,
metric); it stays on the client, the server never sees it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ClientTask:
    """One client's private task: inputs, targets, kind and metric direction.

    Attributes:
        name: the task's name.
        kind: ``multiclass``, ``binary``, ``multilabel``, ``segmentation`` or ``reconstruction``.
        input_kind: ``image`` or ``tokens``.
        x_train: training inputs.
        y_train: training targets.
        x_test: test inputs.
        y_test: test targets.
        num_outputs: the head's outputs (classes, labels or pixels).
        primary_metric: the metric the task is judged by.
        lower_is_better: whether lower values of that metric are better.
    """

    name: str
    kind: str  # multiclass | binary | multilabel | segmentation | reconstruction
    input_kind: str  # image | tokens
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_outputs: int
    primary_metric: str
    lower_is_better: bool

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input example."""
        return tuple(self.x_train.shape[1:])

    @property
    def num_train(self) -> int:
        """Number of training examples."""
        return int(self.x_train.shape[0])
