"""hftl: transfer learning for vision on the Hugging Face stack."""
