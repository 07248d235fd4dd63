"""Managed consumers: GPU services that cannot embed the client (Ollama, vLLM, ComfyUI, TTS and STT
daemons, containers, native processes), declared in a registry file; the boss holds their leases.

:mod:`.registry` reads and checks the registry file; :mod:`.actions` loads and unloads a consumer
through its own mechanism and checks its health.
"""

from .actions import Actions
from .registry import PRESETS, Consumer, Registry, load_registry

__all__ = ["PRESETS", "Actions", "Consumer", "Registry", "load_registry"]
