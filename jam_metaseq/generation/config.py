"""What shapes one ``Engine.generate`` call (paper §3.1 "Decoding Strategies")."""

from __future__ import annotations

from dataclasses import dataclass, field

from jam_metaseq.inputs import check_float

from .cfg import DEFAULT_ALPHA
from .sampling import SamplingConfig


def _default_sampling() -> SamplingConfig:
    return SamplingConfig(temperature=1.0, top_p=0.9)


@dataclass
class GenerationConfig:
    """Everything that shapes one ``generate`` call."""

    max_new_tokens: int = 1280
    """Generated tokens per answer, images included (lowered per prompt to fit the context)."""
    text: SamplingConfig = field(default_factory=_default_sampling)
    """Sampling of text tokens (paper: tau = 1, top-p 0.8-1)."""
    image: SamplingConfig = field(default_factory=_default_sampling)
    """Sampling of image tokens (the repetition penalty is never applied to them)."""
    guidance_scale: float = DEFAULT_ALPHA
    """CFG alpha of Eq. 6 (paper: 3.5 or 4); 1 = plain conditional sampling."""
    guidance: bool = True
    """Run the unconditional rows at all (False halves the batch; image tokens then unguided)."""
    max_images: int = 3
    """Images per answer; 0 forbids images."""
    min_images: int = 0
    """``<eos>`` is forbidden until this many images were written (while one still fits)."""
    force_image_first: bool = False
    """Start the answer with an image (text-to-image)."""
    seed: int = 0
    """Row i of a call uses seed + i unless seeds are given explicitly."""
    check_done_every: int = 1
    """Steps between checks whether every row finished (a host sync on accelerators)."""
    end_id: int | None = None
    """The token that ends an answer (None: ``<eos>``; a conversation's turn ends with ``<eot>``)."""

    def __post_init__(self) -> None:
        check_float(self.guidance_scale, name="guidance_scale")  # NaN or inf would make every image id NaN
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_images < 0 or self.min_images < 0:
            raise ValueError("max_images and min_images must be >= 0")
        if self.check_done_every < 1:
            raise ValueError("check_done_every must be >= 1")
