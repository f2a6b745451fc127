"""Reconstruction's masking modes and the interface the pictures code calls; Classification's
evaluation. References: counts of masked patches, the masker's own outputs, hand-built boxes,
autograd with the probabilities as constants, and accuracies counted by hand."""

from __future__ import annotations

import pytest
import torch

from mlomae.models.masking import Masking, num_learned, num_masked
from problems.finetune import Classification
from problems.pretrain import MaskingSpec, Reconstructed, Reconstruction
from test_problems_tiny import DT, IMG, PATCH, L, tiny_head, tiny_mae, tiny_masker
from test_problems_tiny import one_thread  # noqa: F401  (an autouse fixture)


class Holder:
    """Stands in for the masker problem: ``Reconstruction`` reads ``.module`` through peers."""

    def __init__(self, module):
        self.module = module


def pretrain(masking="random", masker=None, **kw) -> Reconstruction:
    reads = ["mask"] if masker is not None else []
    p = Reconstruction("pretrain", tiny_mae(), reads=reads, masking=masking,
                       **kw)
    if masker is not None:
        p._peers = {"mask": Holder(masker)}
    return p


def images(n=5, seed=0):
    return torch.randn(n, 1, IMG, IMG, generator=torch.Generator().manual_seed(seed), dtype=DT)


def test_random_masking_counts_and_replays_with_the_seed():
    p = pretrain("random", mask_ratio=0.5)
    x = images()
    torch.manual_seed(3)
    a = p.masking_for(x)
    torch.manual_seed(3)
    b = p.masking_for(x)
    assert torch.all(a.mask.sum(1) == num_masked(L, 0.5))      # 9 patches, 4 visible, 5 masked
    assert torch.equal(a.mask, b.mask) and a.weights is None


def test_object_prior_prefers_the_box_from_the_batch_or_from_the_image():
    """A bright 4x8 block on a flat background covers patches 0 and 1 (top row, left two). With
    beta = 1e9 those two are always among the masked: from boxes given with the batch, and from
    ``foreground_boxes`` when the batch has none."""
    x = torch.full((4, 1, IMG, IMG), -1.0, dtype=DT)
    x[:, :, 0:4, 0:8] = 2.0
    p = pretrain("object_prior", beta=1e9, mask_ratio=0.25)    # 3 of 9 masked (keep int(6.75))
    k = num_masked(L, 0.25)
    boxes = torch.tensor([[0.0, 0.0, 8.0, 4.0]] * 4)
    for given in (boxes, None):
        torch.manual_seed(0)
        m = p.masking_for(x, boxes=given).mask
        assert torch.all(m.sum(1) == k) and torch.all(m[:, :2] == 1)


def test_mlo_weights_are_the_masker_probabilities_of_the_top_k():
    masker = tiny_masker()
    p = pretrain("mlo", masker=masker)
    x = images()
    m = p.masking_for(x)
    probs = masker(p.module.embed_patches(x))
    assert torch.equal(m.weights, probs)
    k = num_masked(L, 0.75)
    top = torch.topk(probs, k, dim=1).indices
    assert torch.equal(m.mask.gather(1, top), torch.ones_like(top, dtype=m.mask.dtype))
    # for a discriminator: the 2 (= a third of 7, rounded) most probable, 0/1 forward ...
    learned = m.learned_mask.detach()
    k_learned = num_learned(L, 0.75, 1 / 3)
    assert torch.all(learned.sum(1) == k_learned) and torch.all(learned <= m.mask)
    assert torch.equal(learned.gather(1, top[:, :k_learned]), torch.ones(5, k_learned, dtype=DT))
    # ... and straight-through backward: d sum / d probs = 1 per patch
    g = torch.autograd.grad(m.learned_mask.sum(), m.weights)[0]
    assert torch.equal(g, torch.ones_like(g))


def test_gumbel_learned_and_random_counts():
    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.value = torch.nn.Parameter(torch.zeros(L, dtype=DT))

        def logits(self, x):
            return self.value.expand(x.shape[0], -1)

    p = pretrain("gumbel", masker=Logits(), learned_fraction=1 / 3, tau=0.7)
    torch.manual_seed(0)
    m = p.masking_for(images())
    assert torch.all(m.mask.detach().sum(1) == num_masked(L, 0.75))                 # 7
    assert torch.all(m.learned_mask.detach().sum(1) == num_learned(L, 0.75, 1 / 3))  # 2


@pytest.mark.parametrize("detach", [True, False])
def test_detach_masker_input_decides_whether_pretraining_trains_it(detach):
    """The pretraining gradient of the patch embedding: with ``detach_masker_input`` it equals
    the gradient with the probabilities fed in as constants (pretraining cannot push the
    masker's input); without it, the path through the masker adds to it."""
    masker = tiny_masker()
    p = pretrain("mlo", masker=masker, detach_masker_input=detach)
    x = images()
    w = p.module.patch_embed.proj.weight
    g = torch.autograd.grad(p.loss((x, None))[0], w)[0]
    m = p.masking_for(x)
    const = Masking(m.mask, m.ids_keep, m.ids_restore, weights=m.weights.detach())
    g_const = torch.autograd.grad(p.module(x, const)[0], w)[0]
    if detach:
        assert torch.allclose(g, g_const, rtol=1e-12, atol=1e-15)
    else:
        assert float((g - g_const).norm()) > 1e-6 * float(g_const.norm())


def test_replay_holds_the_detached_masker_input():
    """The loss keeps the embeddings its masker read. Replaying that batch (a finite difference's
    re-evaluation) with the MAE moved gives the step's masks and weights exactly: the detached
    input is data to the masker. A fresh call reads the moved embeddings, and a replay of any
    other batch computes its own."""
    masker = tiny_masker()
    p = pretrain("mlo", masker=masker)
    x = images()
    p.loss((x, None))
    step = p.masking_for(x)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for q in p.module.parameters():
            q.add_(0.5 * torch.randn(q.shape, generator=gen, dtype=q.dtype))
    with p.replay():
        assert p.replaying
        replayed = p.masking_for(x)
        other = images(seed=1)
        assert torch.equal(p.masker_input(other, masker), p.module.embed_patches(other).detach())
    assert not p.replaying
    assert torch.equal(replayed.mask, step.mask) and torch.equal(replayed.weights, step.weights)
    moved = p.masker_input(x, masker)
    assert torch.equal(moved, p.module.embed_patches(x).detach())
    assert not torch.equal(moved, p._held[1])
    assert not torch.equal(p.masking_for(x).weights, step.weights)
    # the official wiring (gradient through the input) holds nothing
    assert pretrain("mlo", masker=masker, detach_masker_input=False).masker_input(x, masker) is None


def test_replay_gives_the_held_input_in_the_parameters_dtype():
    """A step under bf16 autocast can hold bf16 embeddings; a full-precision re-evaluation gets
    them in the MAE's parameter dtype (a masker's Linear refuses mixed dtypes outside autocast)."""
    masker = tiny_masker()
    p = pretrain("mlo", masker=masker)
    x = images()
    held = p.module.embed_patches(x).detach()
    p._held = (x, held.to(torch.bfloat16))
    with p.replay():
        got = p.masker_input(x, masker)
    assert got.dtype == DT
    assert torch.equal(got, held.to(torch.bfloat16).to(DT))


def test_reconstruct_is_the_interface_for_pictures():
    """``reconstruct(imgs)`` -> Reconstructed(loss, pred [N, L, p*p*C], per_patch [N, L],
    masking); the loss is the MAE's own under that masking."""
    p = pretrain("mlo", masker=tiny_masker())
    x = images(3)
    out = p.reconstruct(x)
    assert isinstance(out, Reconstructed)
    assert out.pred.shape == (3, L, PATCH * PATCH) and out.per_patch.shape == (3, L)
    assert torch.equal(out.loss, p.module(x, out.masking)[0])
    assert p.module.unpatchify(out.pred).shape == x.shape


def test_reconstruction_options_are_checked():
    with pytest.raises(ValueError, match="add it to problems.pretrain.reads"):
        Reconstruction("pretrain", tiny_mae(), masking="mlo")
    with pytest.raises(ValueError, match="masking must be one of"):
        MaskingSpec("learned")
    with pytest.raises(ValueError, match="mask ratio"):
        MaskingSpec("random", ratio=1.5)
    with pytest.raises(ValueError, match="masker_input"):
        MaskingSpec("mlo", masker_input="pixels")


def test_classification_evaluate_counts_by_hand():
    """Accuracy (percent) and summed cross-entropy over uneven batches, the head back in
    training mode afterwards, equal to counting the head's argmax by hand."""
    mae, head = tiny_mae(), tiny_head()
    p = Classification("finetune", head, reads=["pretrain"], pool="cls")
    p._peers = {"pretrain": Holder(mae)}
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(n, 1, IMG, IMG, generator=g, dtype=DT) for n in (4, 3)]
    logits = [head(mae.features(x, "cls")).detach() for x in xs]
    ys = [lg.argmax(1) for lg in logits]
    ys[1][0] = (ys[1][0] + 1) % 3                                   # one wrong of 7
    out = p.evaluate(list(zip(xs, ys)))
    assert out["test_count"] == 7
    assert out["test_top1"] == pytest.approx(100 * 6 / 7, abs=1e-12)
    ce = sum(float(torch.nn.functional.cross_entropy(lg, y, reduction="sum"))
             for lg, y in zip(logits, ys)) / 7
    assert out["test_loss"] == pytest.approx(ce, rel=1e-12)
    assert head.training
    with pytest.raises(ValueError, match="reads the encoder"):
        Classification("finetune", head, reads=[])


def test_exact_darts_counts_as_second_order_for_the_attention_switch():
    """darts with exact: true takes a double backward, so `fused_attention: auto` must unfuse;
    finite-difference darts, first order and sama do not."""
    from mlomae.hypergrad import make
    assert [make(m).second_order for m in ("darts", "first_order", "sama")] == [False] * 3
    assert all(make(m).second_order for m in ("unroll", "neumann", "cg"))
    assert make("darts", {"exact": True}).second_order


def test_attention_stays_fused_unless_a_push_differentiates_twice_through_the_module():
    """Per owner: the MAE (owned by pretrain) unfuses only for a second-order push whose lower
    is pretrain, or whose lower reads pretrain and is not a head on top of it."""
    from mlomae.engine import Dependency, Graph
    reads = {"pretrain": ["mask"], "finetune": ["pretrain"], "mask": ["pretrain", "finetune"],
             "critic": ["pretrain"]}

    def twice(method="darts", options=None, head_edge=None, pre_edge=None, critic=None):
        edge = lambda u, l, e: Dependency(u, l, *(e or (None, {})))     # noqa: E731
        deps = [edge("mask", "pretrain", pre_edge), Dependency("finetune", "pretrain"),
                edge("mask", "finetune", head_edge), edge("mask", "critic", critic or ("first_order", {}))]
        g = Graph({n: 1 for n in reads}, reads, deps, default_method=method,
                  default_options=options, reads_once=["finetune"])
        return g.differentiated_twice()

    assert "pretrain" not in twice()
    for head in ((None, {}, {"darts": {"exact": True}}), ("unroll", {}), ("cg", {"iters": 2})):
        assert "pretrain" not in twice(head_edge=head), head
    assert "pretrain" in twice(pre_edge=(None, {}, {"darts": {"exact": True}}))
    assert "pretrain" in twice("neumann")
    assert "pretrain" in twice("darts", {"exact": True})
    assert "critic" not in twice("darts", {"exact": True})
    # a lower that reads pretrain without declaring first_order_reads: the safe side
    assert "pretrain" in twice(critic=("unroll", {}))
