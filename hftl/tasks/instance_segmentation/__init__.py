"""The instance-segmentation task: `task.py` holds the hooks the runner calls; data and eval what they need."""
