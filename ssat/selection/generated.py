"""The generative 'selectors' (PCG, LCG-KM, LCG-GMM): the pool is made by a guided DDPM and used whole."""

from __future__ import annotations

from ssat.generation.guidance import GuidanceLoss
from ssat.selection.simple import FullSelector


class GuidedGeneration(FullSelector):
    """Carries the guidance loss for the generation stages; the generated pool is then taken whole."""

    def __init__(self, name: str, guidance: GuidanceLoss):
        super().__init__(name)
        self.guidance = guidance
