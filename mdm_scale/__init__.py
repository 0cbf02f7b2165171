"""mdm_scale: masked diffusion language models with learned generation orders."""
