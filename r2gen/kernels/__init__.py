"""Hand-written GPU kernels (Triton) of the training step's speed-ups; each module's caller owns its autograd."""
