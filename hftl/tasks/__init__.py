"""Tasks: each subpackage says only what differs between classification, detection and segmentation.

The contract (every hook, with its default) is `hftl.tasks.base.Task`; what data preparation learns is a
`hftl.tasks.base.DataSpec`. The runner, strategies and trainer call those hooks and nothing else.
"""

from importlib import import_module

from hftl.tasks.base import DataSpec, Task

__all__ = ["DataSpec", "Task", "get_task", "task_args"]

TASK_MODULES = {
    "classification": "hftl.tasks.classification.task",
    "detection": "hftl.tasks.detection.task",
    "segmentation": "hftl.tasks.segmentation.task",
    "instance-segmentation": "hftl.tasks.instance_segmentation.task",
}


def _task_definition(name: str):
    if name not in TASK_MODULES:
        raise ValueError(f"Unknown task {name!r}; choose one of {sorted(TASK_MODULES)}.")
    return import_module(TASK_MODULES[name]).TASK


def get_task(name: str, config=None) -> Task:
    """The task object for a run; a module's TASK may be a class (built with the run's config) or an instance."""
    if name == "segmentation" and getattr(getattr(config, "task", None), "subtask", "semantic") == "instance":
        name = "instance-segmentation"  # recipes/segment.py --subtask instance
    task = _task_definition(name)
    return task(config) if isinstance(task, type) else task


def task_args(name: str) -> type | None:
    """The dataclass of the task's own options (`Task.args`), which the recipe's parser adds to the shared ones."""
    return _task_definition(name).args
