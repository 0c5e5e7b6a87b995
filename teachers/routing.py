"""Which teacher scores which sample: rules by domain and modality, weights normalised per sample."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tasks.base import Sample
from teachers.views import modality


@dataclass(frozen=True)
class Route:
    teacher: str
    domains: tuple[str, ...] = ("*",)
    modalities: tuple[str, ...] = ("*",)
    weight: float = 1.0

    def matches(self, sample: Sample) -> bool:
        domain_ok = "*" in self.domains or sample.domain in self.domains
        modality_ok = "*" in self.modalities or modality(sample) in self.modalities
        return domain_ok and modality_ok


class TeacherRouter:
    """`route(samples) -> {teacher: weights [B]}`; every sample's weights sum to 1 over its matching teachers."""

    def __init__(self, routes: list[Route]):
        if not routes:
            raise ValueError("no teacher routes configured")
        self.routes = routes

    def route(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        weights = {r.teacher: torch.zeros(len(samples)) for r in self.routes}
        for i, sample in enumerate(samples):
            matched = [r for r in self.routes if r.matches(sample)]
            total = sum(r.weight for r in matched)
            if not matched or total <= 0:
                raise ValueError(
                    f"sample {sample.id} (domain {sample.domain!r}, modality {modality(sample)!r}) matches no teacher; "
                    f"routes: {[(r.teacher, r.domains, r.modalities) for r in self.routes]}"
                )
            for r in matched:
                weights[r.teacher][i] += r.weight / total
        return weights

    def uncovered(self, domains: list[str], modalities: tuple[str, ...] = ("video", "text")) -> list[str]:
        """Domains no route serves (any modality): checked when a run starts, before any rollout."""
        return [
            d for d in domains
            if not any(("*" in r.domains or d in r.domains) for r in self.routes)
        ]
