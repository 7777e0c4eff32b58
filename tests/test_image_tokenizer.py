"""Image tokenizer (paper §3.1): shapes, taming-layout parity and checkpoint round trips, preprocessing.

Random tiny models only; the trained-model tests live in test_image_tokenizer_train.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from jam_metaseq.image_tokenizer import (
    VQGAN,
    CheckpointMismatchError,
    ImageTokenizer,
    VQGANConfig,
    load_image_tokenizer,
    load_vqgan,
    make_shape_image,
    preset,
    read_config,
    save_taming_checkpoint,
    shape_samples,
)
from jam_metaseq.image_tokenizer.checkpoint import config_yaml, read_state_dict
from jam_metaseq.image_tokenizer.preprocess import (
    pil_to_tensor,
    resize_center_crop,
    tensor_to_pil,
    whiten_transparency,
)
from jam_metaseq.image_tokenizer.synthetic import BACKGROUNDS, COLOURS

torch.set_num_threads(1)

# 32 px, 2 levels (grid 16x16), attention at side 16 and in the middle: covers every module kind.
# GroupNorm(32) as in taming / HF Chameleon, so the HF encoder can serve as a reference.
PARITY_CFG = VQGANConfig(
    resolution=32,
    base_channels=32,
    channel_multipliers=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(16,),
    z_channels=32,
    n_codes=48,
    code_dim=8,
)


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere (GroupNorm affine too), codebook spread like real latents."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embedding" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
    return model.eval()


@pytest.fixture(scope="module")
def parity_model() -> VQGAN:
    torch.manual_seed(0)
    return _randomise(VQGAN(PARITY_CFG), seed=1)


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.stack([pil_to_tensor(s.image, size=size) for s in shape_samples(n, size=size, seed=seed)])


# ---- shapes and ranges -------------------------------------------------------------------------
def test_default_config_is_paper_tokenizer():
    cfg = preset("make_a_scene_256")
    assert cfg.resolution == 256 and cfg.grid == (32, 32) and cfg.n_codes == 8192
    cham = preset("chameleon_512")
    assert cham.grid == (32, 32) and cham.downsample == 16
    assert preset("tiny").grid == (8, 8)


def test_encode_decode_shapes_and_code_range_at_256px():
    # Paper geometry (256 px -> 32x32 codes of 8192) with narrow channels to stay fast on CPU.
    cfg = preset("make_a_scene_256", base_channels=32, z_channels=32, code_dim=8, num_res_blocks=1)
    model = _randomise(VQGAN(cfg), seed=0)
    x = torch.rand(2, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        codes = model.encode(x)
        assert codes.shape == (2, 32, 32) and codes.dtype == torch.int64
        assert int(codes.min()) >= 0 and int(codes.max()) < 8192
        assert model.decode(codes).shape == (2, 3, 256, 256)


def test_tokenizer_pil_api_shapes(parity_model):
    tok = ImageTokenizer(parity_model, batch_size=3)
    imgs = [make_shape_image("circle", "red", size=40, rng=np.random.default_rng(i)) for i in range(5)]
    codes = tok.encode_images(imgs)
    assert codes.shape == (5, 16, 16) and codes.dtype == np.int64
    assert codes.min() >= 0 and codes.max() < tok.n_codes
    assert tok.grid == (16, 16) and tok.tokens_per_image == 256
    out = tok.decode_codes(codes)
    assert len(out) == 5 and all(im.size == (32, 32) and im.mode == "RGB" for im in out)
    flat = tok.decode_codes(codes.reshape(5, -1))  # (N, h*w) is accepted too
    assert np.array_equal(np.asarray(flat[0]), np.asarray(out[0]))
    # batching does not change results
    assert np.array_equal(ImageTokenizer(parity_model, batch_size=16).encode_images(imgs), codes)


def test_decode_rejects_bad_codes(parity_model):
    with pytest.raises(ValueError, match=r"\[0, 48\)"):
        parity_model.decode(torch.full((1, 16, 16), 48))
    with pytest.raises(ValueError, match="shape"):
        parity_model.decode(torch.zeros(1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="expected images"):
        parity_model.encode(torch.zeros(1, 3, 16, 16))


def assert_nearest(codes: torch.Tensor, d: torch.Tensor, *, tol: float = 1e-4) -> None:
    """Every code is a nearest entry under the (N, K) distances ``d``, up to ``tol``.

    Two ways of computing the distances (or the latents) round differently, and may order two
    entries that are closer than that either way; elsewhere the codes must be the argmin. Here the
    closest runner-up is ~3e-4 from the nearest entry, the two computations ~1e-5 apart.
    """
    codes = codes.reshape(-1)
    best = d.min(1).values
    chosen = d.gather(1, codes[:, None])[:, 0]
    assert bool((chosen <= best + tol).all()), float((chosen - best).max())
    assert float((codes == d.argmin(1)).float().mean()) >= 0.99


def test_codes_are_nearest_codebook_entries(parity_model):
    x = _images(3, 32)
    with torch.no_grad():
        z = parity_model.encode_latents(x)  # (B, D, h, w)
        codes = parity_model.encode(x)
        e = parity_model.quantize.embedding.weight
        d = torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), e)  # independent distance
    assert_nearest(codes, d)
    assert len(torch.unique(codes)) > 3  # a degenerate test would map everything to one code


# ---- parity with independent references -------------------------------------------------------
def _hf_encoder(cfg: VQGANConfig):
    chameleon = pytest.importorskip("transformers.models.chameleon.modeling_chameleon")
    hf_cfg = chameleon.ChameleonVQVAEConfig(
        embed_dim=cfg.code_dim,
        num_embeddings=cfg.n_codes,
        latent_channels=cfg.z_channels,
        resolution=cfg.resolution,
        base_channels=cfg.base_channels,
        channel_multiplier=list(cfg.channel_multipliers),
        num_res_blocks=cfg.num_res_blocks,
        attn_resolutions=list(cfg.attn_resolutions),
    )
    return chameleon.ChameleonVQVAE(hf_cfg).eval()


def test_encoder_matches_hf_chameleon_vqvae(parity_model):
    hf = _hf_encoder(PARITY_CFG)
    ours = {k: v for k, v in parity_model.state_dict().items() if not k.startswith("decoder.")}
    # Same key layout: HF's encoder-only model loads our weights strictly.
    hf.load_state_dict(ours, strict=True)
    x = _images(3, 32, seed=5)
    with torch.no_grad():
        ref = hf.encode(x)
        codes = parity_model.encode(x)
        hidden = parity_model.encoder(x)
        z = parity_model.encode_latents(x)
        d = torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), parity_model.quantize.embedding.weight)
    torch.testing.assert_close(hidden, ref.last_hidden_state, rtol=1e-4, atol=1e-4)
    assert_nearest(ref.image_tokens, d)  # HF's codes are the nearest entries to our latents
    assert_nearest(codes, d)

    # Negative control: swapping q and k of the middle attention must change the encoder output.
    broken = dict(ours)
    broken["encoder.mid.attn_1.q.weight"], broken["encoder.mid.attn_1.k.weight"] = (
        ours["encoder.mid.attn_1.k.weight"],
        ours["encoder.mid.attn_1.q.weight"],
    )
    hf.load_state_dict(broken, strict=True)
    with torch.no_grad():
        assert not torch.allclose(hf.encode(x).last_hidden_state, hidden, atol=1e-3)


def _ref_resblock(sd: dict, p: str, h: torch.Tensor, groups: int) -> torch.Tensor:
    def gn(t, name):
        return F.group_norm(t, groups, sd[f"{p}.{name}.weight"], sd[f"{p}.{name}.bias"], eps=1e-6)

    y = F.conv2d(F.silu(gn(h, "norm1")), sd[f"{p}.conv1.weight"], sd[f"{p}.conv1.bias"], padding=1)
    y = F.conv2d(F.silu(gn(y, "norm2")), sd[f"{p}.conv2.weight"], sd[f"{p}.conv2.bias"], padding=1)
    if f"{p}.nin_shortcut.weight" in sd:
        h = F.conv2d(h, sd[f"{p}.nin_shortcut.weight"], sd[f"{p}.nin_shortcut.bias"])
    return h + y


def _ref_attn(sd: dict, p: str, h: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, hh, ww = h.shape
    y = F.group_norm(h, groups, sd[f"{p}.norm.weight"], sd[f"{p}.norm.bias"], eps=1e-6)
    q, k, v = (F.conv2d(y, sd[f"{p}.{n}.weight"], sd[f"{p}.{n}.bias"]).reshape(b, c, -1) for n in "qkv")
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / c**0.5, dim=-1)  # (B, HW_q, HW_k)
    out = torch.einsum("bij,bcj->bci", w, v).reshape(b, c, hh, ww)
    return h + F.conv2d(out, sd[f"{p}.proj_out.weight"], sd[f"{p}.proj_out.bias"])


def _reference_decode(sd: dict, cfg: VQGANConfig, codes: torch.Tensor) -> torch.Tensor:
    """taming ``VQModel.decode(quantize.get_codebook_entry(codes))``, written from the layout."""
    g = cfg.norm_groups
    z = sd["quantize.embedding.weight"][codes].permute(0, 3, 1, 2)  # (B, D, h, w)
    h = F.conv2d(z, sd["post_quant_conv.weight"], sd["post_quant_conv.bias"])
    h = F.conv2d(h, sd["decoder.conv_in.weight"], sd["decoder.conv_in.bias"], padding=1)
    h = _ref_resblock(sd, "decoder.mid.block_1", h, g)
    h = _ref_attn(sd, "decoder.mid.attn_1", h, g)
    h = _ref_resblock(sd, "decoder.mid.block_2", h, g)
    for lvl in reversed(range(len(cfg.channel_multipliers))):
        for b in range(cfg.num_res_blocks + 1):
            h = _ref_resblock(sd, f"decoder.up.{lvl}.block.{b}", h, g)
            if f"decoder.up.{lvl}.attn.{b}.q.weight" in sd:
                h = _ref_attn(sd, f"decoder.up.{lvl}.attn.{b}", h, g)
        if lvl:
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = F.conv2d(h, sd[f"decoder.up.{lvl}.upsample.conv.weight"], sd[f"decoder.up.{lvl}.upsample.conv.bias"], padding=1)
    h = F.silu(F.group_norm(h, g, sd["decoder.norm_out.weight"], sd["decoder.norm_out.bias"], eps=1e-6))
    return F.conv2d(h, sd["decoder.conv_out.weight"], sd["decoder.conv_out.bias"], padding=1)


def test_decoder_matches_functional_taming_reference(parity_model):
    sd = parity_model.state_dict()
    codes = torch.randint(0, PARITY_CFG.n_codes, (2, 16, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = parity_model.decode(codes)
        ref = _reference_decode(sd, PARITY_CFG, codes)
        assert any(k.startswith("decoder.up.1.attn.") for k in sd)  # attention at side 16 exercised
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
        # Negative control: a layout bug that keeps every shape (two same-width blocks of one level
        # read in the wrong order) must change the output.
        swapped = dict(sd)
        for k in [k for k in sd if k.startswith("decoder.up.1.block.0.")]:
            other = k.replace("block.0.", "block.1.")
            swapped[k], swapped[other] = sd[other], sd[k]
        assert not torch.allclose(_reference_decode(swapped, PARITY_CFG, codes), ours, atol=1e-3)


# ---- checkpoints -------------------------------------------------------------------------------
def _lightning_like(model: VQGAN, tmp_path, *, extra: dict | None = None, drop: str | None = None):
    """A taming/Lightning-style checkpoint: state_dict with loss.* weights and training counters."""
    sd = dict(model.state_dict())
    sd["loss.discriminator.main.0.weight"] = torch.zeros(4, 3, 4, 4)
    sd["loss.perceptual_loss.net.slice1.0.weight"] = torch.zeros(2)
    if drop:
        del sd[drop]
    sd.update(extra or {})
    ckpt = tmp_path / "vqgan.ckpt"
    torch.save({"epoch": 3, "global_step": 1234, "state_dict": sd}, ckpt)
    import yaml

    doc = config_yaml(model.config)
    doc["model"]["params"]["lossconfig"] = {"target": "taming.modules.losses.vqperceptual.DummyLoss"}
    doc.pop("jam_metaseq")  # a genuine taming YAML knows nothing of our extras
    (tmp_path / "vqgan.yaml").write_text(yaml.safe_dump(doc))
    return ckpt


def test_taming_checkpoint_from_random_model_loads_and_reproduces(parity_model, tmp_path):
    ckpt = _lightning_like(parity_model, tmp_path)
    loaded = load_vqgan(ckpt)
    assert loaded.config == parity_model.config
    x = _images(2, 32, seed=9)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), parity_model.encode(x))
        codes = parity_model.encode(x)
        assert torch.equal(loaded.decode(codes), parity_model.decode(codes))
    tok = load_image_tokenizer(tmp_path)  # directory form
    assert tok.grid == (16, 16) and tok.n_codes == 48


def test_save_load_round_trip_is_exact(tmp_path):
    cfg = preset("tiny")
    model = _randomise(VQGAN(cfg), seed=4)
    save_taming_checkpoint(model, ckpt_path=tmp_path / "a.ckpt", yaml_path=tmp_path / "a.yaml", metadata={"k": 1})
    assert read_config(tmp_path / "a.yaml") == cfg  # norm_groups=8 survives via the jam_metaseq key
    loaded = load_vqgan(tmp_path / "a.ckpt")  # yaml found by stem
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert set(read_state_dict(tmp_path / "a.ckpt")) == set(model.state_dict())
    assert not list(tmp_path.glob(".*"))  # atomic writes leave no temp files


def test_missing_unexpected_and_misshaped_keys_are_listed(parity_model, tmp_path):
    _lightning_like(parity_model, tmp_path, drop="decoder.conv_out.bias", extra={"encoder.extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointMismatchError) as err:
        load_image_tokenizer(tmp_path)
    msg = str(err.value)
    assert "missing 1 keys: decoder.conv_out.bias" in msg
    assert "unexpected 1 keys: encoder.extra.weight" in msg
    assert "loss." not in msg  # training-loss weights are dropped, not reported

    bad = dict(parity_model.state_dict())
    bad["quantize.embedding.weight"] = torch.zeros(64, 8)
    torch.save({"state_dict": bad}, tmp_path / "vqgan.ckpt")
    with pytest.raises(CheckpointMismatchError, match=r"quantize.embedding.weight \(64, 8\) != \(48, 8\)"):
        load_image_tokenizer(tmp_path / "vqgan.ckpt")


def test_pickled_objects_need_trust(parity_model, tmp_path):
    _lightning_like(parity_model, tmp_path)
    payload = torch.load(tmp_path / "vqgan.ckpt", weights_only=True)
    payload["hparams"] = _Hparams(1)  # an arbitrary pickled object: not loadable weights-only
    torch.save(payload, tmp_path / "vqgan.ckpt")
    with pytest.raises(ValueError, match="refusing to unpickle.*--trust-pickle"):
        load_image_tokenizer(tmp_path)
    assert load_image_tokenizer(tmp_path, trust_pickle=True).n_codes == 48


@dataclasses.dataclass
class _Hparams:
    a: int


def test_missing_files_and_bad_yaml_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="vqgan.ckpt"):
        load_image_tokenizer(tmp_path)
    (tmp_path / "x.yaml").write_text("model:\n  params:\n    n_embed: 8\n")
    with pytest.raises(ValueError, match=r"x.yaml: taming params lack key 'ddconfig'"):
        read_config(tmp_path / "x.yaml")


def test_taming_params_round_trip():
    for name in ("make_a_scene_256", "chameleon_512"):
        cfg = preset(name)
        assert VQGANConfig.from_taming_params(cfg.to_taming_params()) == cfg
    with pytest.raises(ValueError, match="divisible"):
        VQGANConfig(resolution=100, channel_multipliers=(1, 1, 2, 4))
    params = preset("chameleon_512").to_taming_params()
    params["ddconfig"]["attn_type"] = "linear"
    with pytest.raises(ValueError, match="attn_type 'linear' is not supported"):
        VQGANConfig.from_taming_params(params)


# ---- preprocessing -----------------------------------------------------------------------------
def test_pil_tensor_round_trip_is_exact():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    x = pil_to_tensor(img, size=24)
    assert x.shape == (3, 24, 24) and float(x.min()) >= -1 and float(x.max()) <= 1
    assert np.array_equal(np.asarray(tensor_to_pil(x)), arr)
    assert float(pil_to_tensor(Image.new("RGB", (4, 4), (255, 0, 0)), size=4)[0, 0, 0]) == 1.0
    assert float(pil_to_tensor(Image.new("RGB", (4, 4), (255, 0, 0)), size=4)[1, 0, 0]) == -1.0


def test_resize_center_crop_keeps_the_centre():
    # 60 x 20: left third red, middle green, right blue -> centre crop shows only green.
    arr = np.zeros((20, 60, 3), dtype=np.uint8)
    arr[:, :20, 0] = 255
    arr[:, 20:40, 1] = 255
    arr[:, 40:, 2] = 255
    out = np.asarray(resize_center_crop(Image.fromarray(arr), 10))
    assert out.shape == (10, 10, 3)
    assert (out[2:-2, 2:-2, 1] > 200).all() and (out[2:-2, 2:-2, [0, 2]] < 40).all()
    tall = resize_center_crop(Image.new("RGB", (30, 90)), 16)
    assert tall.size == (16, 16)


def test_transparency_is_whitened():
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent -> white
    rgba.putpixel((1, 0), (0, 0, 0, 255))  # opaque black stays black
    out = np.asarray(whiten_transparency(rgba))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [0, 0, 0]
    half = Image.new("RGBA", (1, 1), (0, 0, 0, 128))
    assert abs(int(np.asarray(whiten_transparency(half))[0, 0, 0]) - 127) <= 1


# ---- synthetic images --------------------------------------------------------------------------
@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
def test_shape_image_colours(shape):
    img = make_shape_image(shape, "blue", size=32, rng=np.random.default_rng(0), background="white")
    arr = np.asarray(img).reshape(-1, 3)
    colours = {tuple(c) for c in arr}
    assert colours <= {COLOURS["blue"], BACKGROUNDS["white"]}
    frac = (arr == COLOURS["blue"]).all(1).mean()
    assert 0.05 < frac < 0.6  # a visible shape that does not fill the frame


def test_shape_samples_are_deterministic_and_captioned():
    a, b = shape_samples(6, size=16, seed=7), shape_samples(6, size=16, seed=7)
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    assert a[0].caption == f"a {a[0].colour} {a[0].shape} on a {a[0].background} background"
    c = shape_samples(6, size=16, seed=8)
    assert any(not np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, c))
    with pytest.raises(ValueError, match="unknown shape"):
        make_shape_image("hexagon", "red", size=16, rng=np.random.default_rng(0))
