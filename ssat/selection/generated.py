"""The generative 'selectors' (PCG, LCG-KM, LCG-GMM): the pool is made by a guided DDPM and used whole."""

from __future__ import annotations

from ssat.errors import ConfigError
from ssat.generation.guidance import GuidanceLoss
from ssat.selection.simple import FullSelector


class GuidedGeneration(FullSelector):
    """Carries the guidance loss for the generation stages; the generated pool is then taken whole."""

    def __init__(self, name: str, guidance: GuidanceLoss):
        super().__init__(name)
        self.guidance = guidance

    def pool_stages(self, cfg) -> list:
        from ssat.stages.generate import generation_stages  # the stages import the selectors

        return generation_stages(cfg)

    def check(self, num_candidates: int, has_labels: bool) -> None:
        if has_labels:
            raise ConfigError(f"selector={self.name} generates the unlabeled pool; selection.target=labeled does "
                              f"not apply to it (use selection.target=pool)")
