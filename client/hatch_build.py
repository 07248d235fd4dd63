"""Build hook: ship the Lua scripts from the repository's top-level ``lua/`` folder.

The wheel carries them inside the package as ``gpuboss_client/lua`` (where
``gpuboss_client.scripts`` looks first); the sdist carries them as ``lua/`` beside this file, so a
wheel built from the sdist finds them there. Editable installs get nothing: ``scripts`` falls back
to the checkout's ``lua/`` folder, so edits to the scripts take effect without reinstalling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hatchling.builders.config import BuilderConfig
from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class LuaScriptsHook(BuildHookInterface[BuilderConfig]):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        root = Path(self.root)
        in_sdist, in_checkout = root / "lua", root.parent / "lua"
        if self.target_name == "sdist":
            if not in_sdist.is_dir():  # an unpacked sdist already has lua/ among its own files
                build_data["force_include"][str(self._existing(in_checkout))] = "lua"
        elif self.target_name == "wheel" and version != "editable":
            source = in_sdist if in_sdist.is_dir() else self._existing(in_checkout)
            build_data["force_include"][str(source)] = "gpuboss_client/lua"

    @staticmethod
    def _existing(folder: Path) -> Path:
        if not (folder / "_common.lua").is_file():
            raise FileNotFoundError(f"Lua scripts not found: {folder}")
        return folder
