"""hftl: transfer learning for vision on the Hugging Face stack."""

__version__ = "0.1.0"
