"""Small pieces every package may import (no torch, no project imports): the one `Registry`."""

from core.registry import Registry, RegistryError

__all__ = ["Registry", "RegistryError"]
