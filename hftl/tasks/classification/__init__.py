"""The classification task: `task.py` holds the hooks the runner calls."""
