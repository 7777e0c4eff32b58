"""CLIP document and query encoders for the dense retriever (paper §3.1 "Retrieval Augmentation").

Following RA-CM3 / CM3leon, which JAM adopts: a multimodal document is split into its text and its
image(s); each part goes through its modality's frozen CLIP ViT-B-32 encoder (open_clip), each
embedding is L2-normalised, and the document vector is their average; a one-modality document uses
its one embedding. Choices the papers leave open, made explicit here:
- several images in one document: their normalised embeddings are averaged (and re-normalised)
  into one image part, so text and images weigh equally;
- the average is re-normalised (``renormalize=True``), so every bank score is a cosine in [-1, 1]
  and the 0.9 diversity threshold means the same for one- and two-modality documents.

Query dropout (training only) drops a fraction of the query's tokens before encoding: CLIP BPE
tokens of the text, and ViT patches of the image (the dropped patches are set to 0, the mean
pixel after CLIP's normalisation). ``query_dropout_keep`` is the one random draw both use.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

# A tiny open_clip config for tests (STYLE: presets always include a tiny one). Same tokenizer
# (CLIP BPE, 77 tokens) as ViT-B-32, 32-d embeddings, 32x32 images, 8x8 patches.
TINY_CLIP_NAME = "jam-tiny-clip"
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
_registered_dir: Path | None = None


def register_tiny_clip() -> str:
    """Make ``jam-tiny-clip`` known to open_clip (once per process); returns its name."""
    global _registered_dir
    import open_clip

    if _registered_dir is None:
        _registered_dir = Path(tempfile.mkdtemp(prefix="jam_clip_cfg_"))
        (_registered_dir / f"{TINY_CLIP_NAME}.json").write_text(json.dumps(TINY_CLIP_CONFIG))
        open_clip.add_model_config(_registered_dir)
    return TINY_CLIP_NAME


@dataclass
class ClipEncoderConfig:
    """Which open_clip model encodes documents and queries, and how."""

    model_name: str = "ViT-B-32"
    """open_clip architecture name (``jam-tiny-clip`` is a tiny one for tests)."""
    checkpoint: str | None = None
    """Local weights file (open_clip ``pretrained=<path>``); None = random weights (tests only). Read
    through the allow-listed loader first (``check_clip_checkpoint``)."""
    device: str = "cpu"
    """Torch device of the encoder."""
    batch_size: int = 64
    """Texts or images per forward pass."""
    renormalize: bool = True
    """L2-normalise the averaged text/image vector (scores become cosines)."""
    precision: str = "fp32"
    """open_clip precision (``fp32``, ``fp16``, ``bf16``, ``amp``)."""
    init_seed: int = 0
    """Seed of the random weights when there is no checkpoint (so a bank and its queries agree)."""
    trust_pickle: bool = False
    """Unpickle globals outside the checkpoint loader's allow-list (only for trusted files)."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.checkpoint is not None and not Path(self.checkpoint).is_file():
            raise FileNotFoundError(f"CLIP checkpoint not found: {self.checkpoint}")

    def describe(self) -> dict[str, Any]:
        """What identifies the vectors this encoder makes (stored in the bank manifest)."""
        d = dataclasses.asdict(self)
        d.pop("device")
        d.pop("batch_size")
        d.pop("trust_pickle")
        return d


@dataclass
class QueryParts:
    """One document or query, split by modality: its text (or None) and its images."""

    text: str | None = None
    images: list[Any] = field(default_factory=list)
    """PIL images."""

    def is_empty(self) -> bool:
        return not (self.text and self.text.strip()) and not self.images


def query_dropout_keep(n: int, *, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Bool mask (n,) keeping all but ``round(rate * n)`` uniformly chosen positions (>= 1 kept)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"query dropout rate must be in [0, 1), got {rate}")
    keep = np.ones(n, dtype=bool)
    n_drop = min(int(round(rate * n)), max(n - 1, 0))
    if n_drop > 0:
        keep[rng.choice(n, size=n_drop, replace=False)] = False
    return keep


def check_clip_checkpoint(path: str | Path, *, trust_pickle: bool = False) -> None:
    """Refuse a CLIP weights file before open_clip reads it, in one line naming it: a pickle through
    the checkpoint tools' allow-listed loader (``safe_torch_load``: unsafe globals, truncated or
    not a checkpoint), a safetensors file through its header."""
    from checkpoints_tools.safe_load import CheckpointError, safe_torch_load

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as e:  # noqa: BLE001 - safetensors raises its own (Rust) error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None
    elif path.suffix not in (".npz", ".npy"):  # big_vision numpy weights are no pickle
        safe_torch_load(path, trust_pickle=trust_pickle, mmap=True)


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


@contextmanager
def _loading(config: ClipEncoderConfig) -> Iterator[None]:
    """open_clip's load of ``config.checkpoint``: with the allow-list (what ``check_clip_checkpoint``
    accepted loads), and a failure (weights of another architecture) named in one line."""
    from checkpoints_tools.safe_load import CheckpointError, _allowed_globals

    with _allowed_globals():
        try:
            yield
        except (RuntimeError, KeyError, ValueError) as e:
            foreign = not isinstance(e, RuntimeError) or "state_dict" in str(e)  # not e.g. a device error
            if config.checkpoint is None or isinstance(e, CheckpointError) or not foreign:
                raise
            detail = " ".join(line.strip() for line in str(e).splitlines()[:2] if line.strip())
            raise CheckpointError(f"{config.checkpoint}: not {config.model_name} weights ({detail[:300]})") from None


def _l2(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


class ClipDocumentEncoder:
    """Frozen open_clip encoders producing L2-normalised document vectors (N, D) float32."""

    def __init__(self, *, config: ClipEncoderConfig) -> None:
        import open_clip

        if config.model_name == TINY_CLIP_NAME:
            register_tiny_clip()
        self.config = config
        if config.checkpoint is not None:
            check_clip_checkpoint(config.checkpoint, trust_pickle=config.trust_pickle)
        with torch.random.fork_rng(devices=[]), _loading(config):  # leave the caller's RNG stream untouched
            torch.manual_seed(config.init_seed)
            model, _, preprocess = open_clip.create_model_and_transforms(
                config.model_name, pretrained=config.checkpoint, device=config.device,
                precision=config.precision, weights_only=not config.trust_pickle,
            )
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(config.model_name)
        self.dim = int(open_clip.get_model_config(config.model_name)["embed_dim"])
        self.context_length = int(getattr(self.tokenizer, "context_length", 77))
        patch = getattr(self.model.visual, "patch_size", (32, 32))
        self.patch_size = tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)

    def describe(self) -> dict[str, Any]:
        return {"type": "open_clip", "dim": self.dim, **self.config.describe()}

    # ---- text ------------------------------------------------------------------------------
    def tokenize_texts(self, texts: Sequence[str], *, drop_rate: float = 0.0,
                       rng: np.random.Generator | None = None) -> torch.Tensor:
        """CLIP token ids (B, context_length); with ``drop_rate`` > 0, BPE tokens are dropped."""
        if drop_rate == 0.0:
            return self.tokenizer(list(texts))
        if rng is None:
            raise ValueError("query dropout needs an rng")
        tok = self.tokenizer
        if not all(hasattr(tok, a) for a in ("encode", "sot_token_id", "eot_token_id")):
            # Tokenizers without a BPE encode (HF towers): drop whitespace words instead.
            dropped = []
            for t in texts:
                words = t.split()
                dropped.append(" ".join(w for w, k in zip(words, query_dropout_keep(
                    len(words), rate=drop_rate, rng=rng)) if k))
            return tok(dropped)
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = np.asarray(tok.encode(t), dtype=np.int64)
            ids = ids[query_dropout_keep(ids.size, rate=drop_rate, rng=rng)]
            row = [tok.sot_token_id, *ids[: self.context_length - 2].tolist(), tok.eot_token_id]
            out[i, : len(row)] = torch.tensor(row)
        return out

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], *, drop_rate: float = 0.0,
                     rng: np.random.Generator | None = None) -> np.ndarray:
        """(N, D) float32, L2-normalised text embeddings."""
        outs = [np.zeros((0, self.dim), np.float32)]
        for s in range(0, len(texts), self.config.batch_size):
            ids = self.tokenize_texts(texts[s:s + self.config.batch_size], drop_rate=drop_rate, rng=rng)
            outs.append(_l2(self.model.encode_text(ids.to(self.config.device))).cpu().numpy())
        return np.concatenate(outs)

    # ---- images ----------------------------------------------------------------------------
    def _pixels(self, images: Sequence[Any], *, drop_rate: float,
                rng: np.random.Generator | None) -> torch.Tensor:
        x = torch.stack([self.preprocess(im) for im in images])  # (B, 3, H, W), normalised
        if drop_rate > 0.0:
            if rng is None:
                raise ValueError("query dropout needs an rng")
            ph, pw = self.patch_size
            gh, gw = x.shape[-2] // ph, x.shape[-1] // pw
            for b in range(x.shape[0]):
                keep = query_dropout_keep(gh * gw, rate=drop_rate, rng=rng)
                for p in np.flatnonzero(~keep):
                    r, c = divmod(int(p), gw)
                    x[b, :, r * ph:(r + 1) * ph, c * pw:(c + 1) * pw] = 0.0
        return x

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Any], *, drop_rate: float = 0.0,
                      rng: np.random.Generator | None = None) -> np.ndarray:
        """(N, D) float32, L2-normalised image embeddings of PIL images."""
        outs = [np.zeros((0, self.dim), np.float32)]
        for s in range(0, len(images), self.config.batch_size):
            x = self._pixels(images[s:s + self.config.batch_size], drop_rate=drop_rate, rng=rng)
            outs.append(_l2(self.model.encode_image(x.to(self.config.device))).cpu().numpy())
        return np.concatenate(outs)

    # ---- documents -------------------------------------------------------------------------
    def encode_documents(self, docs: Sequence[QueryParts], *, drop_rate: float = 0.0,
                         rng: np.random.Generator | None = None, progress: bool = False) -> np.ndarray:
        """(N, D) float32 document vectors: normalised text and image parts, averaged."""
        texts, text_owner, images, image_owner = [], [], [], []
        for i, d in enumerate(docs):
            if d.is_empty():
                raise ValueError(f"document {i} has neither text nor an image to encode")
            if d.text and d.text.strip():
                texts.append(d.text)
                text_owner.append(i)
            for im in d.images:
                images.append(im)
                image_owner.append(i)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(texts) + len(images), desc="clip encode", unit="part",
                       file=sys.stderr, leave=False)
        text_vecs = self._batched(self.encode_texts, texts, drop_rate, rng, bar)
        image_vecs = self._batched(self.encode_images, images, drop_rate, rng, bar)
        if bar is not None:
            bar.close()
        return combine_parts(n_docs=len(docs), text_vecs=text_vecs, text_owner=text_owner,
                             image_vecs=image_vecs, image_owner=image_owner,
                             renormalize=self.config.renormalize, dim=self.dim)

    def _batched(self, fn, items, drop_rate, rng, bar) -> np.ndarray:
        outs = [np.zeros((0, self.dim), np.float32)]
        for s in range(0, len(items), self.config.batch_size):
            chunk = items[s:s + self.config.batch_size]
            outs.append(fn(chunk, drop_rate=drop_rate, rng=rng))
            if bar is not None:
                bar.update(len(chunk))
        return np.concatenate(outs)


def combine_parts(*, n_docs: int, text_vecs: np.ndarray, text_owner: Sequence[int],
                  image_vecs: np.ndarray, image_owner: Sequence[int], renormalize: bool,
                  dim: int) -> np.ndarray:
    """Average each document's normalised parts: mean(text, mean(images)); (n_docs, D) float32."""
    img_sum = np.zeros((n_docs, dim), np.float64)
    img_cnt = np.zeros(n_docs, np.int64)
    np.add.at(img_sum, np.asarray(image_owner, dtype=np.int64), image_vecs.astype(np.float64))
    np.add.at(img_cnt, np.asarray(image_owner, dtype=np.int64), 1)
    has_img = img_cnt > 0
    img_part = np.zeros_like(img_sum)
    img_part[has_img] = img_sum[has_img] / img_cnt[has_img, None]
    norms = np.linalg.norm(img_part[has_img], axis=1, keepdims=True)
    img_part[has_img] /= np.maximum(norms, 1e-12)
    txt_part = np.zeros((n_docs, dim), np.float64)
    has_txt = np.zeros(n_docs, bool)
    if len(text_owner):
        txt_part[np.asarray(text_owner)] = text_vecs
        has_txt[np.asarray(text_owner)] = True
    parts = has_txt.astype(np.float64) + has_img.astype(np.float64)  # (N,) 1 or 2
    if (parts == 0).any():
        raise ValueError(f"document {int(np.flatnonzero(parts == 0)[0])} has no encoded part")
    vec = (txt_part + img_part) / parts[:, None]
    if renormalize:
        vec /= np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-12)
    return vec.astype(np.float32)
