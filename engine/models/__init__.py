"""DiffKT3D: the Wan-compatible VAE, the Any2Any DiT, the tiny preview codec, checkpoints."""
