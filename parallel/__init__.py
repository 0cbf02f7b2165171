"""Process groups, layer specs, CPU compatibility and checkpoints. Knows nothing of diffusion."""
