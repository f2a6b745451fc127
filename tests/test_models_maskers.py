"""Maskers and the AutoMAE generator: shapes, sizes, attention maps, and the gradient paths from
the reconstruction loss back to the masker."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from mlomae.models.attention import attention_probs
from mlomae.models.mae import MaskedAutoencoder
from mlomae.models.maskers import (
    AttentionMaskGenerator, PatchMLPMasker, PixelMasker, SharedPatchMasker,
)
from mlomae.models.masking import gumbel_topk_masking, prob_topk_masking

TINY = dict(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=1, num_heads=2,
            decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_patch_mlp_masker_size_and_range():
    """Parameter count is the closed form L*D*h + h + h*L + L (= 49*32*16 + 16 + 16*49 + 49);
    output [N, L] strictly inside (0, 1); a wrong embedding shape is refused."""
    masker = PatchMLPMasker(num_patches=49, embed_dim=32, hidden_dim=16)
    assert sum(p.numel() for p in masker.parameters()) == 49 * 32 * 16 + 16 + 16 * 49 + 49
    probs = masker(torch.randn(3, 49, 32))
    assert probs.shape == (3, 49) and torch.all((probs > 0) & (probs < 1))
    with pytest.raises(ValueError, match=r"\[N, 49, 32\]"):
        masker(torch.randn(3, 16, 32))


@pytest.mark.parametrize("depth", [0, 1])
def test_shared_patch_masker_size_does_not_grow_with_patches(depth):
    """Same parameters serve L = 16 and L = 49; depth 0 scores each patch alone, so permuting
    the patches permutes the output."""
    masker = SharedPatchMasker(embed_dim=32, hidden_dim=16, depth=depth, num_heads=4)
    for L in (16, 49):
        probs = masker(torch.randn(2, L, 32))
        assert probs.shape == (2, L) and torch.all((probs > 0) & (probs < 1))
    if depth == 0:
        x, perm = torch.randn(2, 16, 32), torch.randperm(16)
        torch.testing.assert_close(masker(x[:, perm]), masker(x)[:, perm])


def test_pixel_masker_reads_images():
    """Own patch embedding: 28x28 images with 4-px patches -> 49 probabilities each."""
    masker = PixelMasker(img_size=28, patch_size=4, in_chans=1, embed_dim=32, hidden_dim=16)
    probs = masker(torch.randn(2, 1, 28, 28))
    assert probs.shape == (2, 49) and torch.all((probs > 0) & (probs < 1))


@pytest.mark.parametrize("masker_kind", ["mlp", "shared"])
def test_mlo_mae_gradient_reaches_masker_as_central_difference(masker_kind):
    """MLO-MAE's only differentiable path: loss = sum(l_i * mask_i * p_i) / k. The autograd
    directional derivative g . v equals (loss(theta + eps v) - loss(theta - eps v)) / (2 eps) in
    float64 with the top-k selection unchanged by the perturbation (asserted); the loss is smooth
    in theta there, so the difference is exact to O(eps^2) ~ 1e-12."""
    torch.manual_seed(0)
    mae = MaskedAutoencoder(**TINY).double()
    if masker_kind == "mlp":
        masker = PatchMLPMasker(num_patches=4, embed_dim=16, hidden_dim=8).double()
    else:
        masker = SharedPatchMasker(embed_dim=16, hidden_dim=8, depth=1, num_heads=2).double()
    imgs = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=_gen(1))
    emb = mae.embed_patches(imgs).detach()   # the caller's choice: no path into the MAE here

    def loss_and_mask():
        masking = prob_topk_masking(masker(emb), 0.5)
        return mae(imgs, masking)[0], masking.mask

    params = list(masker.parameters())
    loss, mask0 = loss_and_mask()
    grad = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
    theta = parameters_to_vector(params).detach().clone()
    eps = 1e-6
    for seed in (2, 3, 4):
        v = torch.randn(theta.shape, dtype=torch.float64, generator=_gen(seed))
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                vector_to_parameters(theta + sign * eps * v, params)
                value, mask = loss_and_mask()
            assert torch.equal(mask, mask0), "perturbation changed the top-k selection"
            values.append(value)
        with torch.no_grad():
            vector_to_parameters(theta, params)
        fd = (values[0] - values[1]) / (2 * eps)
        torch.testing.assert_close(grad @ v, fd, rtol=1e-7, atol=1e-10)


def test_masker_gradient_reaches_mae_embedding_only_when_not_detached():
    """The docstring's contract: detaching the embeddings is what cuts the path into the MAE."""
    torch.manual_seed(0)
    mae = MaskedAutoencoder(**TINY)
    masker = SharedPatchMasker(embed_dim=16, hidden_dim=8)
    imgs = torch.randn(2, 1, 8, 8)
    for detach in (True, False):
        emb = mae.embed_patches(imgs)
        probs = masker(emb.detach() if detach else emb)
        per_patch = mae(imgs, prob_topk_masking(probs, 0.5))[2].detach()  # masker path only
        loss = mae.masked_loss(per_patch, prob_topk_masking(probs, 0.5))
        (g,) = torch.autograd.grad(loss, [mae.patch_embed.proj.weight], allow_unused=True)
        assert (g is None) == detach


def test_gumbel_straight_through_reaches_logits_through_mae_loss():
    """AutoMAE path through the real model: d loss / d logits equals the softmax-Jacobian closed
    form (1/tau) s_j (c_j - sum_i s_i c_i), s = softmax((logits + g) / tau), with
    c_i = per_patch_i / (number of masked patches in the batch): the gradient reaches the
    logits only through mask multiplying the per-patch loss."""
    torch.manual_seed(0)
    mae = MaskedAutoencoder(**{**TINY, "img_size": 16}).double()   # L = 16
    N, L, tau = 2, 16, 0.5
    imgs = torch.randn(N, 1, 16, 16, dtype=torch.float64, generator=_gen(5))
    logits = torch.randn(N, L, dtype=torch.float64, generator=_gen(6)).requires_grad_()
    g = -torch.log(-torch.log(torch.rand(N, L, dtype=torch.float64, generator=_gen(7))))
    masking = gumbel_topk_masking(logits, 0.75, tau, 1 / 3, generator=_gen(8), gumbel=g)
    loss, _, per_patch = mae(imgs, masking)
    (grad,) = torch.autograd.grad(loss, logits)
    c = per_patch.detach() / (N * 12)          # 12 = num_masked(16, 0.75) per sample
    s = torch.softmax((logits.detach() + g) / tau, dim=1)
    torch.testing.assert_close(grad, s * (c - (s * c).sum(1, keepdim=True)) / tau,
                               rtol=1e-10, atol=1e-14)


def _generator(**kw) -> AttentionMaskGenerator:
    torch.manual_seed(0)
    args = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=16, depth=2, num_heads=2,
                conv_channels=(8, 8))
    return AttentionMaskGenerator(**{**args, **kw})


def test_attention_probs_reproduce_timm_attention_output():
    """Our q/k recomputation is checked against timm's own forward (fused SDPA on):
    proj((P @ v) merged over heads) equals Attention(x) to float64 round-off."""
    gen = _generator().double()
    attn = gen.blocks[-1].attn
    x = torch.randn(2, 17, 16, dtype=torch.float64, generator=_gen(9))
    P = attention_probs(attn, x)                                  # [2, heads, 17, 17]
    v = attn.qkv(x).reshape(2, 17, 3, 2, 8).permute(2, 0, 3, 1, 4)[2]
    out = attn.proj((P @ v).transpose(1, 2).reshape(2, 17, 16))
    torch.testing.assert_close(out, attn(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(P.sum(-1), torch.ones(2, 2, 17, dtype=torch.float64))


def test_generator_maps_and_logits():
    """Maps [N, heads, gh, gw]; each head's CLS row over patches sums to 1 minus its CLS->CLS
    weight (a softmax row); logits [N, L]."""
    gen = _generator()
    imgs = torch.randn(3, 1, 16, 16, generator=_gen(10))
    maps = gen.attention_maps(imgs)
    assert maps.shape == (3, 2, 4, 4)
    assert torch.all(maps > 0) and torch.all(maps.sum((2, 3)) < 1)
    logits = gen(imgs)
    assert logits.shape == (3, 16)
    torch.testing.assert_close(logits, gen.logits_from_attention(maps))


def test_generator_frozen_backbone_trains_head_only():
    """Freezing backbone_parameters() leaves exactly the conv head trainable and receiving grad."""
    gen = _generator()
    for p in gen.backbone_parameters():
        p.requires_grad_(False)
    gen(torch.randn(2, 1, 16, 16)).square().sum().backward()
    trainable = {n for n, p in gen.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in gen.head.named_parameters(prefix="head")}
    assert all(p.grad is not None for p in gen.head.parameters())


def test_generator_loads_timm_vit_weights():
    """timm's names: a VisionTransformer state dict loads with only the conv head missing and
    only timm's final norm unexpected (the generator reads attention before it)."""
    gen = _generator()
    vit = VisionTransformer(img_size=16, patch_size=4, in_chans=1, num_classes=0, embed_dim=16,
                            depth=2, num_heads=2, qkv_bias=True)
    result = gen.load_state_dict(vit.state_dict(), strict=False)
    assert set(result.missing_keys) == {n for n in gen.state_dict() if n.startswith("head.")}
    assert set(result.unexpected_keys) == {"norm.weight", "norm.bias"}
    assert torch.equal(gen.blocks[1].attn.qkv.weight, vit.blocks[1].attn.qkv.weight)


def test_centred_shared_masker_is_blind_to_a_common_shift():
    """center=True: every image's logits average 0, and a constant added to every logit (here
    through the output bias) changes no probability; uncentred, the same shift moves them all."""
    torch.manual_seed(0)
    x = torch.randn(3, 49, 16, dtype=torch.float64)
    for center in (True, False):
        masker = SharedPatchMasker(embed_dim=16, hidden_dim=8, center=center).double()
        before = masker(x)
        with torch.no_grad():
            masker.fc2.bias += 2.0
        after = masker(x)
        if center:
            torch.testing.assert_close(masker.logits(x).mean(dim=1),
                                       torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)
            torch.testing.assert_close(after, before, atol=1e-12, rtol=0)
        else:
            assert torch.all(after > before)


def test_generator_loads_a_random_mask_mae_export_and_freezes(tmp_path):
    """AutoMAE as published reads a pretrained ViT: the backbone of an MAE exported for timm
    (safetensors) loads into the generator (its attention maps then equal the MAE's own
    class-token attention, averaged over heads), and freeze leaves only the conv head training."""
    from safetensors.torch import save_file
    from mlomae.models.mae import MaskedAutoencoder
    from mlomae.models.maskers import AttentionMaskGenerator
    torch.manual_seed(0)
    mae = MaskedAutoencoder(28, 4, 1, 32, 2, 4, 32, 1, 4)
    enc = {k: v.contiguous() for k, v in mae.state_dict().items()
           if not k.startswith("decoder_") and k != "mask_token"}
    save_file(enc, str(tmp_path / "enc.safetensors"))
    gen = AttentionMaskGenerator(28, 4, 1, 32, 2, 4, conv_channels=(4,),
                                 pretrained=str(tmp_path / "enc.safetensors"), freeze=True)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(gen.attention_maps(x).flatten(2).mean(1), mae.cls_attention(x),
                                   rtol=0, atol=1e-6)
    assert [n for n, p in gen.named_parameters() if p.requires_grad] == \
        [n for n, _ in gen.head.named_parameters(prefix="head")]
    with pytest.raises(ValueError, match="does not fit"):
        AttentionMaskGenerator(28, 4, 1, 64, 2, 4, pretrained=str(tmp_path / "enc.safetensors"))
    with pytest.raises(ValueError, match="not found"):
        AttentionMaskGenerator(28, 4, 1, 32, 2, 4, pretrained=str(tmp_path / "none.safetensors"))
