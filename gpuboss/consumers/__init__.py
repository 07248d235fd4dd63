"""Managed consumers: GPU services that cannot embed the client (Ollama, vLLM, ComfyUI, TTS and STT
daemons, containers, native processes), declared in a registry file; the boss holds their leases.

:mod:`.registry` reads and checks the registry file; :mod:`.actions` loads and unloads a consumer
through its own mechanism and checks its health; :mod:`.pids` finds its processes for the agent;
:mod:`.manager` holds its leases and drives its states; :mod:`.routes` is ``/v1/consumers``; and
:mod:`.service` runs the manager inside ``gpuboss serve``.
"""

from .actions import Actions
from .manager import ConsumerManager
from .registry import PRESETS, Consumer, Registry, load_registry

__all__ = ["PRESETS", "Actions", "Consumer", "ConsumerManager", "Registry", "load_registry"]
