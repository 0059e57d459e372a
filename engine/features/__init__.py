"""Model inputs: the GDP-HMM model grid, the seven normalised modalities, beam/angle plates."""
