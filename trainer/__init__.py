"""Training stages on top of engine (no Qt): VAE, cache, distill, any2any, dose, scardnft."""
