"""VQGAN-family image tokenizer network: encoder, vector quantizer, decoder (paper §3.1 Tokenizers).

Architecture only (no device, optimizer or checkpoint logic). Module names reproduce the
taming-transformers ``VQModel`` state-dict layout (also Chameleon's ``vqgan.ckpt`` and the HF
``ChameleonVQVAE`` encoder), so a checkpoint of that family loads without renaming:

  encoder.conv_in                       3 -> ch, 3x3
  encoder.down.{l}.block.{b}            ResnetBlock (norm1, conv1, norm2, conv2[, nin_shortcut])
  encoder.down.{l}.attn.{b}             AttnBlock (norm, q, k, v, proj_out), at attn_resolutions
  encoder.down.{l}.downsample.conv      3x3 stride 2 after right/bottom zero pad (all but last level)
  encoder.mid.{block_1, attn_1, block_2}
  encoder.norm_out, encoder.conv_out    -> z_channels
  quant_conv                            z_channels -> code_dim, 1x1
  quantize.embedding.weight             (n_codes, code_dim) codebook
  post_quant_conv                       code_dim -> z_channels, 1x1
  decoder.conv_in, decoder.mid.*        mirror of the encoder's end
  decoder.up.{l}.block.{b}              num_res_blocks + 1 blocks per level, l = 0 is full resolution
  decoder.up.{l}.upsample.conv          nearest x2 then 3x3 (all but level 0)
  decoder.norm_out, decoder.conv_out    -> 3 channels

Quantization (VQ-VAE, van den Oord et al. 2017): code = argmin_k ||z - e_k||^2; training uses the
straight-through estimator and L_vq = ||sg[z] - e||^2 + beta ||z - sg[e]||^2, or an EMA codebook
(then only the commitment term is a loss). EMA statistics are non-persistent buffers, so the
state dict keeps the taming layout exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import VQGANConfig


def _norm(channels: int, cfg: VQGANConfig) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=cfg.norm_groups, num_channels=channels, eps=cfg.norm_eps, affine=True)


def _conv3(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=1, padding=1)


class ResnetBlock(nn.Module):
    """GroupNorm-swish-conv twice, plus a 1x1 ``nin_shortcut`` when the width changes."""

    def __init__(self, *, in_channels: int, out_channels: int, cfg: VQGANConfig) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels, cfg)
        self.conv1 = _conv3(in_channels, out_channels)
        self.norm2 = _norm(out_channels, cfg)
        self.conv2 = _conv3(out_channels, out_channels)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        else:
            self.nin_shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, 1x1 convs as projections."""

    def __init__(self, channels: int, cfg: VQGANConfig) -> None:
        super().__init__()
        self.norm = _norm(channels, cfg)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # (B, C, H, W) -> (B, 1, HW, C): one head of width C, softmax(q k^T / sqrt(C)) v
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(-1, -2) for t in (self.q(y), self.k(y), self.v(y)))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve the side: zero-pad right/bottom by one, then a 3x3 stride-2 conv (taming)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double the side: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _conv3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, channels: int, cfg: VQGANConfig) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(in_channels=channels, out_channels=channels, cfg=cfg)
        self.attn_1 = AttnBlock(channels, cfg)
        self.block_2 = ResnetBlock(in_channels=channels, out_channels=channels, cfg=cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution level: residual blocks, each optionally followed by attention, then a resampler."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class Encoder(nn.Module):
    """(B, 3, R, R) in [-1, 1] -> (B, z_channels, R/f, R/f)."""

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        chans = cfg.level_channels
        self.conv_in = _conv3(cfg.in_channels, cfg.base_channels)
        self.down = nn.ModuleList()
        c_in, side = cfg.base_channels, cfg.resolution
        for lvl, c_out in enumerate(chans):
            level = _Level()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(in_channels=c_in, out_channels=c_out, cfg=cfg))
                c_in = c_out
                if side in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(c_in, cfg))
            if lvl != len(chans) - 1:
                level.downsample = Downsample(c_in)
                side //= 2
            self.down.append(level)
        self.mid = _Mid(c_in, cfg)
        self.norm_out = _norm(c_in, cfg)
        self.conv_out = _conv3(c_in, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level.run_blocks(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, R/f, R/f) -> (B, 3, R, R), unbounded (clamp to [-1, 1] for pixels)."""

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        chans = cfg.level_channels
        c_in = chans[-1]
        side = cfg.resolution // cfg.downsample
        self.conv_in = _conv3(cfg.z_channels, c_in)
        self.mid = _Mid(c_in, cfg)
        levels: list[_Level] = []
        # Built from the coarsest level up; stored so that up[0] is full resolution (taming order).
        for lvl in reversed(range(len(chans))):
            level = _Level()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(in_channels=c_in, out_channels=chans[lvl], cfg=cfg))
                c_in = chans[lvl]
                if side in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(c_in, cfg))
            if lvl != 0:
                level.upsample = Upsample(c_in)
                side *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(c_in, cfg)
        self.conv_out = _conv3(c_in, cfg.in_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level.run_blocks(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Quantized(NamedTuple):
    z_q: torch.Tensor
    """(B, D, h, w) quantized latents (straight-through in training)."""
    codes: torch.Tensor
    """(B, h, w) int64 code indices."""
    loss: torch.Tensor
    """Scalar VQ loss (codebook + beta * commitment; commitment only with EMA)."""
    perplexity: torch.Tensor
    """exp(entropy) of the batch's code histogram: how many codes are in use."""


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup; ``embedding.weight`` is (n_codes, code_dim)."""

    def __init__(self, cfg: VQGANConfig, *, ema_decay: float | None = None) -> None:
        super().__init__()
        self.n_codes, self.code_dim, self.beta = cfg.n_codes, cfg.code_dim, cfg.commitment_beta
        self.embedding = nn.Embedding(cfg.n_codes, cfg.code_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / cfg.n_codes, 1.0 / cfg.n_codes)
        self.ema_decay = ema_decay
        # EMA statistics: training state only, not part of the taming checkpoint layout.
        self.register_buffer("ema_cluster_size", torch.zeros(cfg.n_codes), persistent=False)
        self.register_buffer("ema_embed_sum", self.embedding.weight.detach().clone(), persistent=False)

    def set_ema(self, decay: float | None) -> None:
        """Switch to (decay in (0, 1)) or from (None) the EMA codebook update; resets the statistics."""
        self.ema_decay = decay
        if decay is not None:
            self.embedding.weight.requires_grad_(False)
            self.ema_cluster_size.fill_(1.0)
            self.ema_embed_sum.copy_(self.embedding.weight.detach())
        else:
            self.embedding.weight.requires_grad_(True)

    def nearest(self, z_flat: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N,) index of the closest code in squared L2 distance."""
        e = self.embedding.weight
        # ||z||^2 + ||e||^2 - 2 z.e, (N, K); the ||z||^2 term does not change the argmin but keeps d >= 0
        d = z_flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2.0 * z_flat @ e.t()
        return d.argmin(dim=1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) int codes -> (B, D, h, w) code vectors."""
        return self.embedding(codes).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> Quantized:
        b, d, h, w = z.shape
        z_flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (B*h*w, D)
        idx = self.nearest(z_flat.detach())
        onehot = F.one_hot(idx, self.n_codes).to(z_flat.dtype)  # (N, K)
        if self.training and self.ema_decay is not None:
            self._ema_update(z_flat.detach(), onehot)
        e = self.embedding(idx)  # (N, D)
        commitment = F.mse_loss(z_flat, e.detach())
        if self.ema_decay is None:
            loss = F.mse_loss(e, z_flat.detach()) + self.beta * commitment
        else:
            loss = self.beta * commitment
        e = z_flat + (e - z_flat).detach()  # straight-through: d e / d z = I
        z_q = e.reshape(b, h, w, d).permute(0, 3, 1, 2).contiguous()
        p = onehot.mean(0)
        perplexity = torch.exp(-(p * torch.log(p + 1e-10)).sum())
        return Quantized(z_q=z_q, codes=idx.reshape(b, h, w), loss=loss, perplexity=perplexity)

    @torch.no_grad()
    def _ema_update(self, z_flat: torch.Tensor, onehot: torch.Tensor, eps: float = 1e-5) -> None:
        decay = self.ema_decay
        self.ema_cluster_size.mul_(decay).add_(onehot.sum(0), alpha=1 - decay)
        self.ema_embed_sum.mul_(decay).add_(onehot.t() @ z_flat, alpha=1 - decay)
        n = self.ema_cluster_size.sum()
        # Laplace smoothing keeps rarely used codes from dividing by ~0.
        size = (self.ema_cluster_size + eps) / (n + self.n_codes * eps) * n
        self.embedding.weight.copy_(self.ema_embed_sum / size.unsqueeze(1))

    @torch.no_grad()
    def restart_codes(
        self, dead: torch.Tensor, samples: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> None:
        """Move the codes flagged in ``dead`` (K,) bool onto rows of ``samples`` (N, D).

        Rows are drawn with probability proportional to their squared distance to the nearest
        live code (k-means++ seeding): restarted codes land where the codebook is worst, not in
        the densest region, where they would only duplicate a live code.
        """
        k = int(dead.sum())
        if k == 0 or samples.shape[0] == 0:
            return
        live = self.embedding.weight[~dead]
        if live.shape[0]:
            err = torch.cdist(samples, live).min(dim=1).values.pow(2)  # (N,)
        else:
            err = torch.ones(samples.shape[0], device=samples.device)
        if float(err.sum()) <= 0:
            err = torch.ones_like(err)
        rows = torch.multinomial(err.cpu(), k, replacement=k > samples.shape[0], generator=generator)
        pick = samples[rows.to(samples.device)]
        self.embedding.weight[dead] = pick
        if self.ema_decay is not None:
            self.ema_embed_sum[dead] = pick
            self.ema_cluster_size[dead] = 1.0


class ForwardOut(NamedTuple):
    reconstruction: torch.Tensor
    """(B, 3, R, R) decoder output."""
    vq_loss: torch.Tensor
    codes: torch.Tensor
    """(B, h, w) int64."""
    perplexity: torch.Tensor
    z: torch.Tensor
    """(B, D, h, w) pre-quantization latents (for dead-code restarts)."""


class VQGAN(nn.Module):
    """The tokenizer network; ``encode``/``decode`` move between [-1, 1] images and code grids."""

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        if cfg.double_z:
            raise ValueError("double_z=True is a VAE encoder, not a VQ tokenizer")
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.code_dim, kernel_size=1)
        self.quantize = VectorQuantizer(cfg)
        self.post_quant_conv = nn.Conv2d(cfg.code_dim, cfg.z_channels, kernel_size=1)

    def _check_images(self, x: torch.Tensor) -> None:
        r, c = self.config.resolution, self.config.in_channels
        if x.dim() != 4 or x.shape[1] != c or x.shape[2] != r or x.shape[3] != r:
            raise ValueError(f"expected images of shape (B, {c}, {r}, {r}), got {tuple(x.shape)}")

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) -> (B, code_dim, h, w) continuous latents before quantization."""
        self._check_images(x)
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) in [-1, 1] -> (B, h, w) int64 codes in [0, n_codes)."""
        z = self.encode_latents(x)
        b, d, h, w = z.shape
        return self.quantize.nearest(z.permute(0, 2, 3, 1).reshape(-1, d)).reshape(b, h, w)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) int codes -> (B, 3, R, R) images (unclamped; ~[-1, 1])."""
        gh, gw = self.config.grid
        if codes.dim() != 3 or tuple(codes.shape[1:]) != (gh, gw):
            raise ValueError(f"expected codes of shape (B, {gh}, {gw}), got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.config.n_codes):
            raise ValueError(
                f"codes must lie in [0, {self.config.n_codes}), got [{int(codes.min())}, {int(codes.max())}]"
            )
        return self.decode_latents(self.quantize.lookup(codes.long()))

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        """(B, code_dim, h, w) -> (B, 3, R, R)."""
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, x: torch.Tensor) -> ForwardOut:
        z = self.encode_latents(x)
        q = self.quantize(z)
        return ForwardOut(
            reconstruction=self.decode_latents(q.z_q),
            vq_loss=q.loss,
            codes=q.codes,
            perplexity=q.perplexity,
            z=z,
        )


__all__ = ["VQGAN", "Encoder", "Decoder", "VectorQuantizer", "ResnetBlock", "AttnBlock", "ForwardOut"]
