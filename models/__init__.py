"""Model families (`models.families`: PixArt-Sigma/Alpha, SD3, DiT, Flux), presets and builders (seeded random weights
or a local diffusers checkpoint), and the dit-stats recipe."""
