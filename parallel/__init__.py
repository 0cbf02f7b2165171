"""Process groups, layer specs, CPU compatibility and checkpoints. Knows nothing of diffusion."""

import warnings

# megatron-core warns, at import and on every layer build, that Transformer Engine and Apex are missing (true on
# every CPU machine) and about a default of its own config; none of it is actionable for a user, so the training
# log states the fallback once instead (mdm_scale/train.py).
for _message in ("Transformer Engine and Apex are not installed", "Apex is not installed",
                 "full scope is deprecated"):
    warnings.filterwarnings("ignore", message=_message, category=UserWarning)
