"""MaskedAutoencoder: patch layout, position embedding, visible-only encoding, losses, timm export,
double backward."""

from __future__ import annotations

import math

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from mlomae.models.mae import MaskedAutoencoder, fused_attention, sincos_pos_embed
from mlomae.models.masking import (
    Masking, gumbel_topk_masking, num_masked, object_prior_masking, prob_topk_masking,
    random_masking, score_masking,
)

SMALL = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=4,
             decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
TINY = dict(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=1, num_heads=2,
            decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2)


def _model(seed: int = 0, **kw) -> MaskedAutoencoder:
    torch.manual_seed(seed)
    return MaskedAutoencoder(**kw)


def test_patchify_layout_and_roundtrip():
    """Pixel (c, y, x) lands in patch (y // p) * gw + x // p at offset ((y % p) * p + x % p) * C + c:
    MAE's einsum 'nchpwq->nhwpqc'. unpatchify inverts it exactly."""
    m = _model(img_size=8, patch_size=4, in_chans=3, embed_dim=16, depth=1, num_heads=2,
               decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2)
    imgs = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    x = m.patchify(imgs)
    assert x.shape == (2, 4, 48)
    p, C = 4, 3
    for n, c, y, xx in [(0, 0, 0, 0), (0, 2, 5, 6), (1, 1, 3, 7), (1, 0, 7, 2)]:
        assert x[n, (y // p) * 2 + xx // p, ((y % p) * p + xx % p) * C + c] == imgs[n, c, y, xx]
    assert torch.equal(m.unpatchify(x), imgs)


def test_sincos_pos_embed_values():
    """Closed form (Transformer / MAE): for D=16 each axis gets 8 channels, sin then cos of
    pos * omega_i with omega = 10000^(-i/4) = (1, 0.1, 0.01, 0.001); columns first, then rows."""
    emb = sincos_pos_embed(16, (3, 4), cls_token=True)
    assert emb.shape == (13, 16)
    assert torch.all(emb[0] == 0)
    omega = torch.tensor([1.0, 0.1, 0.01, 0.001], dtype=torch.float64)
    r, c = 1, 2
    expected = torch.cat([torch.sin(c * omega), torch.cos(c * omega),
                          torch.sin(r * omega), torch.cos(r * omega)]).float()
    torch.testing.assert_close(emb[1 + r * 4 + c], expected, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed(18, (2, 2))


def _modes(N: int, L: int, side: int) -> dict[str, Masking]:
    g = torch.Generator().manual_seed(0)
    return {
        "random": random_masking(N, L, 0.75, "cpu", generator=g),
        "score": score_masking(torch.rand(N, L, generator=g), 0.75),
        "prob": prob_topk_masking(torch.rand(N, L, generator=g), 0.75),
        "gumbel": gumbel_topk_masking(torch.randn(N, L, generator=g), 0.75, 1.0, 1 / 3, g),
        "object": object_prior_masking(torch.tensor([[4.0, 4.0, 20.0, 24.0]]).repeat(N, 1),
                                       (side, side), 4, 0.75, 0.5, g),
    }


def test_encoder_receives_only_visible_tokens():
    """L=49, ratio 0.75: MAE keeps int(49 * 0.25) = 12 patches, so the first block sees
    1 + 12 = 13 tokens in every mode; and pixels of masked patches cannot change the latent."""
    m = _model(**SMALL).eval()
    seen = []
    hook = m.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape))
    imgs = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    try:
        for name, masking in _modes(3, 49, 7).items():
            latent = m.forward_encoder(imgs, masking)
            assert seen[-1] == (3, 1 + 12, 32), name
            assert latent.shape == (3, 13, 32), name
            # overwrite every masked patch's pixels: the latent must not move at all
            noisy = m.patchify(imgs) + 100.0 * masking.mask.detach()[..., None]
            assert torch.equal(m.forward_encoder(m.unpatchify(noisy), masking), latent), name
    finally:
        hook.remove()
    assert 49 - num_masked(49, 0.75) == 12


def test_forward_shapes_and_loss_is_masked_mean():
    """loss = sum(per_patch * mask) / sum(mask) (no weights), from the returned per-patch loss."""
    m = _model(**SMALL)
    imgs = torch.randn(2, 1, 28, 28)
    masking = random_masking(2, 49, 0.75, imgs.device, generator=torch.Generator().manual_seed(2))
    loss, pred, per_patch = m(imgs, masking)
    assert pred.shape == (2, 49, 16) and per_patch.shape == (2, 49)
    torch.testing.assert_close(loss, (per_patch * masking.mask).sum() / 74.0)


def test_masked_loss_formula_on_given_numbers():
    """Hand-computed: losses (1, 2, 3, 4), mask (1, 0, 1, 0): unweighted (1 + 3) / 2 = 2;
    weights (0.5, 9, 0.25, 9): (1 * 0.5 + 3 * 0.25) / 2 = 0.625."""
    m = _model(**TINY)
    per_patch = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mk = Masking(mask=torch.tensor([[1.0, 0.0, 1.0, 0.0]]), ids_keep=torch.tensor([[1, 3]]),
                 ids_restore=torch.tensor([[2, 0, 3, 1]]))
    assert m.masked_loss(per_patch, mk).item() == 2.0
    mk.weights = torch.tensor([[0.5, 9.0, 0.25, 9.0]])
    assert m.masked_loss(per_patch, mk).item() == 0.625


def test_patch_loss_normalised_pixels():
    """A patch holding 0..15 against a zero prediction: with norm_pix_loss the mean squared
    normalised value is (n - 1) / n = 15/16 (unbiased variance, eps 1e-6 negligible); without it,
    mean(k^2) = 1240 / 16 = 77.5."""
    imgs = torch.zeros(1, 1, 8, 8)
    imgs[0, 0, :4, :4] = torch.arange(16.0).view(4, 4)
    for norm_pix, expected in [(True, 15 / 16), (False, 77.5)]:
        m = _model(**{**TINY, "norm_pix_loss": norm_pix})
        loss = m.patch_loss(imgs, torch.zeros(1, 4, 16))
        assert math.isclose(loss[0, 0].item(), expected, rel_tol=1e-6)


def test_features_pool_the_tokens_of_forward_features():
    """forward_features gives every token [N, 1 + 49, D] (timm's meaning); features pools them:
    'cls' is token 0, 'mean' the average of the 49 patch tokens; bad pool names raise."""
    m = _model(**SMALL).eval()
    imgs = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        tokens = m.forward_features(imgs)
        assert tokens.shape == (2, 50, 32)
        assert torch.equal(m.features(imgs, "cls"), tokens[:, 0])
        torch.testing.assert_close(m.features(imgs, "mean"), tokens[:, 1:].sum(1) / 49,
                                   rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="'max'"):
        m.features(imgs, "max")


def test_encoder_state_dict_loads_into_timm_vit():
    """Export path: drop decoder_* and mask_token, load strictly into timm's VisionTransformer;
    its pooled (token) features equal features(pool='cls') to 1e-6, and its forward_features
    (every token) ours."""
    m = _model(**SMALL).eval()
    with torch.no_grad():   # non-trivial norms so the comparison covers them
        m.norm.weight.normal_()
        m.norm.bias.normal_()
    enc = {k: v for k, v in m.state_dict().items()
           if not k.startswith("decoder_") and k != "mask_token"}
    vit = VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=0, embed_dim=32,
                            depth=2, num_heads=4, mlp_ratio=4.0, qkv_bias=True,
                            global_pool="token").eval()
    vit.load_state_dict(enc, strict=True)
    imgs = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(vit(imgs), m.features(imgs, "cls"), rtol=0, atol=1e-6)
        torch.testing.assert_close(vit.forward_features(imgs), m.forward_features(imgs),
                                   rtol=0, atol=1e-6)


def _flat_grad(m: MaskedAutoencoder, imgs, masking, create_graph=False):
    params = [p for p in m.parameters()]
    loss, _, _ = m(imgs, masking)
    return torch.cat([g.flatten() for g in
                      torch.autograd.grad(loss, params, create_graph=create_graph)]), params


def test_double_backward_without_fused_attention_is_hessian_vector_product():
    """With fused attention off, H v by double backward equals the central difference
    (g(theta + eps v) - g(theta - eps v)) / (2 eps) in float64. Its error is O(eps^2): measured
    on this case 9.4e-5, 9.4e-7 at eps 1e-5, 1e-6 against max |H v| = 77, so a tolerance of
    1e-6 * max |H v| at eps = 1e-6 leaves an 80x margin and still catches a wrong term."""
    m = _model(**TINY).double()
    imgs = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    masking = random_masking(2, 4, 0.5, imgs.device, generator=torch.Generator().manual_seed(5))
    with fused_attention(m, False):
        g, params = _flat_grad(m, imgs, masking, create_graph=True)
        v = torch.randn(g.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
        hv = torch.cat([h.flatten() for h in torch.autograd.grad(g @ v, params)])
        theta = parameters_to_vector(params).detach().clone()
        eps, grads = 1e-6, []
        for sign in (1, -1):
            with torch.no_grad():
                vector_to_parameters(theta + sign * eps * v, params)
            grads.append(_flat_grad(m, imgs, masking)[0])
        with torch.no_grad():
            vector_to_parameters(theta, params)
    fd = (grads[0] - grads[1]) / (2 * eps)
    torch.testing.assert_close(hv, fd, rtol=0, atol=1e-6 * hv.abs().max().item())


def test_fused_attention_context_restores_flags_even_on_failure():
    """On the CPU the fused kernel has no double backward (torch 2.14: 'derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented'). Whatever
    happens inside, the context puts every module's previous flag back."""
    m = _model(**TINY)
    flags = lambda: [a.fused_attn for a in m.modules() if hasattr(a, "fused_attn")]  # noqa: E731
    before = flags()
    assert len(before) == 2   # one encoder block, one decoder block
    imgs = torch.randn(2, 1, 8, 8)
    masking = random_masking(2, 4, 0.5, imgs.device)
    with fused_attention(m, False):
        assert flags() == [False, False]
    assert flags() == before
    failed = False
    try:
        with fused_attention(m, True):
            g, params = _flat_grad(m, imgs, masking, create_graph=True)
            torch.autograd.grad(g.square().sum(), params)
    except RuntimeError as err:
        failed = True
        assert "derivative" in str(err) or "not implemented" in str(err)
    assert flags() == before
    if imgs.device.type == "cpu" and not failed:
        pytest.skip("this torch build double-differentiates fused CPU attention; nothing to guard")
