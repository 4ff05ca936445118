"""The segmentation task: `task.py` holds the hooks the runner calls; data, eval and models what they need."""
