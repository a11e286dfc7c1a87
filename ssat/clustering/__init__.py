"""Clustering back-ends for latent selection: FAISS k-means and Gaussian mixtures."""
