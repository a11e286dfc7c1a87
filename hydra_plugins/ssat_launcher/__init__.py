"""Hydra plugins of ssat (Hydra looks for plugins in the hydra_plugins namespace only)."""
