"""Shared fixtures of the env tests: a modest hypothesis profile and a tiny photo folder (CIFAR-10 layout)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from PIL import Image

# Games are cheap but not free: a few dozen examples per property keep the whole env suite within seconds.
settings.register_profile("envs", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("envs")

PHOTO_COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A folder of 6 class subfolders (class_0 ... class_5), each with two solid-colour images of its class colour."""
    root = tmp_path_factory.mktemp("photos")
    for k, rgb in enumerate(PHOTO_COLOURS):
        folder = root / f"class_{k}"
        folder.mkdir()
        for j in range(2):
            Image.new("RGB", (32, 32), rgb).save(folder / f"img_{j}.png")
    (root / "empty_class").mkdir()  # no images: not a class
    (root / "notes.txt").write_text("not a class either")
    return str(root)
