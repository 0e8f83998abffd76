"""PixArt-Sigma presets and builders (seeded random weights or a local diffusers checkpoint)."""
