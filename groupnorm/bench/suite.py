"""Shapes from real models, the one list every benchmark and smoke check draws from."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple


@dataclass(frozen=True)
class Case:
    name: str            # where the shape comes from
    shape: Tuple[int, ...]
    num_groups: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


# CPU suite (issue 3): SD UNet / VAE at batch 1-2, a detection neck, a video VAE (5-D).
CPU_SUITE: List[Case] = [
    Case("sd-vae-dec b1 128x512x512", (1, 128, 512, 512), 32),
    Case("sd-unet b2 320x64x64", (2, 320, 64, 64), 32),
    Case("sd-unet b2 640x32x32", (2, 640, 32, 32), 32),
    Case("sd-unet b2 1280x8x8", (2, 1280, 8, 8), 32),
    Case("sd-vae-enc b1 512x64x64", (1, 512, 64, 64), 32),
    Case("fpn-neck b2 256x100x152", (2, 256, 100, 152), 32),
    Case("video-vae b1 128x9x64x64", (1, 128, 9, 64, 64), 32),
]

# GPU suite (issue 4): SD 1.5 / SDXL UNet and VAE at batch 1 and 8, a video-VAE shape.
GPU_SUITE: List[Case] = [
    Case("sd15-unet b1 320x64x64", (1, 320, 64, 64), 32),
    Case("sd15-unet b8 320x64x64", (8, 320, 64, 64), 32),
    Case("sd15-unet b8 1280x8x8", (8, 1280, 8, 8), 32),
    Case("sdxl-unet b1 640x64x64", (1, 640, 64, 64), 32),
    Case("sdxl-unet b8 1280x32x32", (8, 1280, 32, 32), 32),
    Case("sd-vae-dec b1 128x512x512", (1, 128, 512, 512), 32),
    Case("sd-vae-dec b1 256x1024x1024", (1, 256, 1024, 1024), 32),
    Case("sdxl-vae-dec b8 512x128x128", (8, 512, 128, 128), 32),
    Case("video-vae b1 128x17x128x128", (1, 128, 17, 128, 128), 32),
]

# Small shapes for a quick check (CI, --quick).
QUICK_SUITE: List[Case] = [
    Case("small 2x64x32x32", (2, 64, 32, 32), 32),
    Case("odd 3x30x17x23", (3, 30, 17, 23), 5),
    Case("5-D 1x32x4x16x16", (1, 32, 4, 16, 16), 8),
]
