"""mdm_scale: masked diffusion language models with learned generation orders."""

import parallel  # noqa: F401  (before megatron-core is imported: silences its import-time warnings)
