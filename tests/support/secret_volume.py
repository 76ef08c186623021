"""A directory laid out and updated the way the kubelet updates a mounted
Secret: each version in a hidden directory of its own, `..data` a symlink
to the current one, and every file name a symlink through `..data`. An
update writes the new version, then renames a new `..data` symlink over the
old one, so the files change at once, by a symlink swap rather than a
write to the file a reader has open (the inode it saw never changes)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path


class SecretVolume:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._versions = itertools.count(1)

    def path(self, name: str) -> Path:
        return self.directory / name

    def publish(self, files: dict[str, bytes]) -> None:
        """Makes `files` the volume's content, all at once."""
        version = self.directory / f"..version_{next(self._versions)}"
        version.mkdir(parents=True)
        for name, content in files.items():
            (version / name).write_bytes(content)
            link = self.directory / name
            if not link.is_symlink():
                link.symlink_to(Path("..data") / name)
        staged = self.directory / "..data_tmp"
        staged.symlink_to(version.name)
        os.replace(staged, self.directory / "..data")
