"""Gradio demo Spaces: `run_space` serves a model locally, `publish_space` pushes it as a Space.

builder.py is the one app (self-contained: it is copied into each published Space); publish.py writes the Space.
"""

from hftl.spaces.builder import TASKS, build_demo, infer_task, load_pipeline, run_space
from hftl.spaces.publish import publish_space, render_app

__all__ = ["TASKS", "build_demo", "infer_task", "load_pipeline", "publish_space", "render_app", "run_space"]
