"""Camera perception with a PyTorch detector that fine-tunes itself with clipped gradients."""
