"""runner: a plugin-based deep-learning experiment runner for image classification."""

__version__ = "0.1.0"
