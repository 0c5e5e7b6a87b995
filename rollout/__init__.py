"""On-policy generation: engines (transformers, vLLM, demonstrations) behind one interface, on Ray actors."""

from rollout.base import Generations, RolloutEngine, SamplingSettings, get_engine_class, register_engine

__all__ = ["Generations", "RolloutEngine", "SamplingSettings", "get_engine_class", "register_engine"]
