"""Guided DDPM generation (PCG, LCG-KM, LCG-GMM): guidance losses, the UNet, and resumable sampling."""

from ssat.generation.guidance import CentroidGapGuidance, ConfidenceGuidance, GMMGapGuidance, GuidanceLoss

__all__ = ["CentroidGapGuidance", "ConfidenceGuidance", "GMMGapGuidance", "GuidanceLoss"]
