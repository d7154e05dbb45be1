"""Tasks: data + model + metric. `get(name)` returns a Task; `names()` lists them."""

from __future__ import annotations

import importlib

from fourbit.tasks.base import OPTIMIZERS, Defaults, Task, bootstrap

# name -> (module, class); imported on first use so a task's dependencies load only for it
_TASKS = {
    "fashion-resnet20": ("fourbit.tasks.vision", "FashionResNet20"),
    "fashion-mobilenetv2": ("fourbit.tasks.vision", "FashionMobileNetV2"),
    "speech-bilstm": ("fourbit.tasks.speech", "SpeechBiLSTM"),
    "translate-transformer": ("fourbit.tasks.translate", "TranslateTransformer"),
}


def names() -> list[str]:
    return list(_TASKS)


def get(name: str) -> Task:
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(_TASKS)}")
    module, cls = _TASKS[name]
    return getattr(importlib.import_module(module), cls)()


__all__ = ["OPTIMIZERS", "Defaults", "Task", "bootstrap", "get", "names"]
